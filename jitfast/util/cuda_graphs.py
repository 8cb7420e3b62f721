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
