"""The one place where the model's op backend is chosen: "torch", "triton" or "auto".

A backend is a module exposing the functions of ``jitfast.functional.ops`` under the same names and
signatures. "torch" is the pure-PyTorch reference; "triton" is ``jitfast.kernels``; "auto" picks
the kernels for CUDA tensors when they can be imported and the reference everywhere else.
"""
from jitfast.functional import ops as torch_ops

BACKENDS = ("torch", "triton", "auto")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_ops():
    """The Triton kernel module, or an ImportError that says what is missing. (An import
    statement, not importlib, so that torch.compile traces through it.)"""
    try:
        from jitfast import kernels
    except ImportError as err:
        raise ImportError(
            f"backend='triton' needs the fused kernels in jitfast.kernels, which could not be "
            f"imported ({err}). Install Triton (pip install 'jitfast[dev]') or use "
            f"backend='torch'.") from err
    return kernels


def ops_for(backend, device):
    """The op module to run on `device` for the configured backend."""
    if backend == "torch":
        return torch_ops
    if backend == "triton":
        return triton_ops()
    if device.type != "cuda":
        return torch_ops
    try:
        return triton_ops()
    except ImportError:
        return torch_ops


def head_kernels(net, device):
    """jitfast.kernels when `net` is a JiT whose ops run as Triton kernels on `device`, so that a
    caller can fuse its epilogue into the output head (``JiT.forward``'s ``head``); else None."""
    backend = getattr(net, "backend", None)
    if backend is None:
        return None
    ops = ops_for(backend, device)
    return None if ops is torch_ops else ops
