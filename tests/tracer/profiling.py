"""Reading single allocations out of a torch.profiler run (for the memory-bound tests)."""

from __future__ import annotations

import pytest


def allocation_sizes(prof) -> list[int]:
    """Bytes of every single CPU allocation the profiler saw."""
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError) as exc:  # private API; skip rather than lie
        pytest.skip(f"profiler event tree unavailable: {exc}")
    sizes, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
    return sizes
