"""attnscope's exceptions: one root, `AttnscopeError`, for every error a user can cause.

The CLI prints any `AttnscopeError` as one line and exits 2; anything else is a bug and keeps its
traceback. Each subclass also keeps the builtin base callers relied on before the root existed
(`except ValueError` still catches a bad selection). The tracer's errors live here too, so the
torch-free half can name them and `tracer` re-exports them.
"""

from __future__ import annotations


class AttnscopeError(Exception):
    """Root of every error attnscope raises for bad input, a bad store or an unsupported model."""


class UsageError(AttnscopeError, ValueError):
    """A command or call asked for something that cannot be done as asked (a bad option value)."""


class FormatError(AttnscopeError, ValueError):
    """A store that is not an attnscope trace, is damaged, or is of a format version not known."""


class CorruptChunkError(FormatError):
    """A stored chunk that cannot be read or decoded, or a listed step whose data is lost."""


class SelectionError(AttnscopeError, ValueError):
    """A selection that names labels, dims, runs or options the trace does not have."""


class SpanError(AttnscopeError, ValueError):
    """A span that names no token of the prompt, or a token range the run cannot answer."""


class UnsupportedModelError(AttnscopeError, TypeError):
    """The pipeline is not of a model family attnscope can trace, or runs in a way it can't read."""


class TapError(AttnscopeError, RuntimeError):
    """An attention could not be traced (no SDPA call seen, or one attnscope can't read)."""


class WriterError(AttnscopeError, RuntimeError):
    """The trace writer failed (disk full, store gone); the steps written before are kept."""


__all__ = [
    "AttnscopeError",
    "CorruptChunkError",
    "FormatError",
    "SelectionError",
    "SpanError",
    "TapError",
    "UnsupportedModelError",
    "UsageError",
    "WriterError",
]
