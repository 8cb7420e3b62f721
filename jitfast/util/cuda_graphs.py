"""CUDA-graph capture, PyTorch's whole-network recipe in one place: warm-up work runs on a side
stream (it compiles, autotunes and allocates: none of that may happen inside a capture), then one
call is captured and replayed.

Capture runs in "thread_local" error mode: in the default "global" mode a CUDA call that is
unsafe during capture made by any other thread of the process (a DataLoader's pin-memory thread
allocating pinned memory, say) invalidates the capture and leaves an error that kills the run at
its next batch.
"""
import torch


def on_side_stream(stream, fn):
    """fn() run on `stream` after the work already queued on the current stream, which waits for
    it in turn; returns fn()'s result."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return out


def capture(fn):
    """(graph, out): fn() captured as a CUDA graph, and its output tensors, which every
    graph.replay() overwrites. Every kernel variant fn launches must have run before."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def no_cast_cache():
    """CUDA autocast as the caller set it (on or off, its dtype), without the weight-cast cache."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                          enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)


class CapturedRun:
    """run(y, z), a whole sampling trajectory from labels y and state z, captured as one CUDA
    graph over static copies of y and z, and replayed for every call.

    The warm-up before the capture is the whole run, once eagerly on a side stream: every kernel
    variant the capture will launch (Triton's specialise on the alignment of each pointer, which
    changes along a time grid's slices) is then compiled, autotuned and loaded.

    Under autocast, the casts of the weights are captured as kernels (autocast's cast cache is
    off for the warm-up and the capture): a cached copy would be freed when the caller's autocast
    region ends, and would miss the new values of weights changed in place (EMA swaps)."""

    def __init__(self, run, y, z):
        self.y, self.z = y.clone(), z.clone()

        def trajectory():
            with no_cast_cache():
                return run(self.y, self.z)
        on_side_stream(torch.cuda.Stream(), trajectory)
        self.graph, self.out = capture(trajectory)

    def __call__(self, y, z):
        self.y.copy_(y)
        self.z.copy_(z)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites self.out
