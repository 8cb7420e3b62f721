"""Named phases of a step (forward, backward, optimizer, ...): a torch.profiler range, so that
``python -m jitfast.bench profile`` can attribute time to them, and an NVTX range for Nsight
Systems when the ``nvtx`` package is installed. Used around host-side phases only, never inside
compiled code."""
from contextlib import ExitStack

import torch

try:
    import nvtx
except ImportError:
    nvtx = None


def phase(name):
    stack = ExitStack()
    stack.enter_context(torch.profiler.record_function(name))
    if nvtx is not None:
        stack.enter_context(nvtx.annotate(name))
    return stack
