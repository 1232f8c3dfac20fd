"""attnscope's GPU half: attach to a pipeline, record exact attention slices to a Zarr store."""

from tracer.session import Recorder, trace

__all__ = ["Recorder", "trace"]
