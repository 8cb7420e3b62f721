"""SwiGLU's hidden width padded to a multiple of 8 inside the matmuls.

JiT-L/16's width is int(1024·4·2/3) = 2730 and JiT-H/16's 3413: a bf16 row of either is not a
multiple of 16 bytes, and a GPU's fast matmul kernels (on Hopper the TMA and wgmma ones) need
that alignment of every operand's rows; cuBLAS falls back to kernels several times slower for
all four of the MLP's matmuls and their grads (benchmarks/NOTES.md). The official pMF port
rounds its width up to a multiple of 8 for the same reason, above width 1024 only.

Padding with zeros is exact: the padded hidden units are SiLU(0)·0 = 0 and meet zero columns
of the output weight, so outputs and gradients are unchanged, and the padded weights' grads
are sliced back to the parameters' (official) shapes by autograd. Weights stay unpadded in the
state dict, the optimizer and the EMAs; each training forward pads them (a weight-sized copy,
where a step's activations are a hundred times larger). A sampler's evaluations all read the
same weights: within ``padded_once`` they take one padded copy made for the whole run (at batch
1 on JiT-L/16 the per-evaluation pads were a quarter of an evaluation's modelled time).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from jitfast.util.amp import autocast_dtype
from jitfast.util.sharded import is_sharded

ALIGN = 8  # elements: 16 bytes of bf16


def padded_width(width):
    """width rounded up to a multiple of ALIGN."""
    return -(-width // ALIGN) * ALIGN


def padded_swiglu(w_in, b_in, w_out):
    """(w_in, b_in, w_out) of a SwiGLU of hidden width H — w_in (2H, D) its two halves stacked,
    b_in (2H,) or None, w_out (D, H) — with H padded by zero units to ``padded_width(H)``; the
    same tensors when H is a multiple of ALIGN already."""
    width = w_out.shape[1]
    pad = padded_width(width) - width
    if not pad:
        return w_in, b_in, w_out
    w_in = F.pad(w_in.unflatten(0, (2, width)), (0, 0, 0, pad)).flatten(0, 1)
    if b_in is not None:
        b_in = F.pad(b_in.unflatten(0, (2, width)), (0, pad)).flatten()
    return w_in, b_in, F.pad(w_out, (0, pad))


class PaddedSwiGLU:
    """What a SwiGLU module (a ``torch.nn.Module``) mixes in: ``swiglu_weights()``, the weights
    its forward multiplies by, padded (``padded_swiglu``) — or, in a forward without gradients
    within ``padded_once``, the copy made there. The module defines ``unpadded()``: its
    (w_in, b_in or None, w_out)."""

    held = None

    def swiglu_weights(self):
        if self.held is not None and not torch.is_grad_enabled():
            return self.held
        return padded_swiglu(*self.unpadded())


@contextmanager
def padded_once(net):
    """Within: the forwards of `net` run without gradients read every SwiGLU's padded weights
    from one copy made on entry (the matrices in autocast's dtype when autocast is on: the
    matmuls then cast nothing either; the bias, which the fused op adds, as it is), not from a
    pad in each forward. For runs whose weights do not change, such as a sampler's trajectory;
    FSDP2-sharded SwiGLUs (their weights gathered only inside their forward) keep padding their
    own."""
    dtype = autocast_dtype(next(net.parameters()).device.type)
    held = []
    with torch.no_grad():
        for module in net.modules():
            if not isinstance(module, PaddedSwiGLU):
                continue
            weights = module.unpadded()
            if not any(is_sharded(w) for w in weights if w is not None):
                w_in, b_in, w_out = padded_swiglu(*weights)
                if dtype is not None:
                    w_in, w_out = w_in.to(dtype), w_out.to(dtype)
                module.held = (w_in, b_in, w_out)
                held.append(module)
    try:
        yield net
    finally:
        for module in held:
            module.held = None
