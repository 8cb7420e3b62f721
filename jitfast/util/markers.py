"""Named phases of a step (forward, backward, optimizer, ...): a torch.profiler range, so that
``python -m jitfast.bench profile`` can attribute time to them, an NVTX range for Nsight
Systems when the ``nvtx`` package is installed, and the thread's current phase
(``current_phase``), which ``python -m jitfast.bench trace`` reads. Used around host-side phases
only, never inside compiled code."""
import threading
from contextlib import ExitStack

import torch

try:
    import nvtx
except ImportError:
    nvtx = None

_open = threading.local()  # .names: the thread's open phases, innermost last


def phase(name):
    stack = ExitStack()
    stack.enter_context(torch.profiler.record_function(name))
    if nvtx is not None:
        stack.enter_context(nvtx.annotate(name))
    names = _open.__dict__.setdefault("names", [])
    names.append(name)
    stack.callback(names.pop)
    return stack


def current_phase():
    """The innermost phase open on this thread, or None."""
    names = getattr(_open, "names", None)
    return names[-1] if names else None
