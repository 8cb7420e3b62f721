"""NVTX ranges for Nsight Systems through the ``nvtx`` package when it is installed; a no-op
otherwise. Used around host-side phases only, never inside compiled code."""
from contextlib import nullcontext

try:
    import nvtx
except ImportError:
    nvtx = None


def nvtx_range(name):
    return nvtx.annotate(name) if nvtx is not None else nullcontext()
