"""attnscope's GPU half: attach to a pipeline, record exact attention slices to a Zarr store."""

from analysis.errors import (
    AttnscopeError,
    FormatError,
    SpanError,
    TapError,
    UnsupportedModelError,
    UsageError,
    WriterError,
)
from tracer.estimate import Estimate, estimate
from tracer.session import Recorder, trace

__all__ = [
    "AttnscopeError",
    "Estimate",
    "FormatError",
    "Recorder",
    "SpanError",
    "TapError",
    "UnsupportedModelError",
    "UsageError",
    "WriterError",
    "estimate",
    "trace",
]
