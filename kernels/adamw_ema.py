"""The training step's update of one weight in one pass: AdamW, the EMA sets, and the weight's
compute copy (bf16 under autocast), reading the grad, the weight, both moments and the EMAs once
and writing each once.

A step of the separate ops reads and writes the weight and the moments (AdamW), then the weight
and each EMA again (one lerp pass per set), and autocast casts the weight to bf16 in every
forward and its bf16 grad back to float32: about 64 bytes a parameter in ~280 kernels for
JiT-B/16, against 44 bytes here in one launch per weight.

The math is torch's AdamW (decoupled weight decay, bias-corrected moments) and the EMA's
ema + (1 - decay)·(weight - ema) of the updated weight; ``scalars`` (on the device, so that a
CUDA graph can replay the step) holds lr, 1/(1 - β1^step) and 1/sqrt(1 - β2^step).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import use_kernel

BLOCK = 2048


@triton.jit
def _adamw_ema_step(P, G, M, V, E1, E2, C, SCALARS, n, beta1, beta2, eps, weight_decay, decay1,
                    decay2, HAS_E1: tl.constexpr, HAS_E2: tl.constexpr, HAS_COPY: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr = tl.load(SCALARS)
    correction1 = tl.load(SCALARS + 1)
    correction2 = tl.load(SCALARS + 2)
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - (lr * correction1) * m / (tl.sqrt(v) * correction2 + eps)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    if HAS_E1:
        e = tl.load(E1 + offs, mask=mask, other=0.0)
        tl.store(E1 + offs, e + (1.0 - decay1) * (p - e), mask=mask)
    if HAS_E2:
        e = tl.load(E2 + offs, mask=mask, other=0.0)
        tl.store(E2 + offs, e + (1.0 - decay2) * (p - e), mask=mask)
    if HAS_COPY:
        tl.store(C + offs, p.to(C.dtype.element_ty), mask=mask)


@torch.library.custom_op("jitfast::adamw_ema_",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "ema1", "ema2", "copy"))
def adamw_ema_op(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, scalars: torch.Tensor, beta1: float, beta2: float,
                 eps: float, weight_decay: float, ema1: Optional[torch.Tensor], decay1: float,
                 ema2: Optional[torch.Tensor], decay2: float, copy: Optional[torch.Tensor]
                 ) -> None:
    n = param.numel()
    _adamw_ema_step[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, ema1, ema2, copy, scalars, n, beta1, beta2, eps,
        weight_decay, decay1, decay2, HAS_E1=ema1 is not None, HAS_E2=ema2 is not None,
        HAS_COPY=copy is not None, BLOCK=BLOCK)


@adamw_ema_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, scalars, beta1, beta2, eps, weight_decay, ema1, decay1,
      ema2, decay2, copy):
    return None


def adamw_ema_(param, grad, exp_avg, exp_avg_sq, scalars, betas, eps, weight_decay, emas=(),
               decays=(), copy=None):
    """In place: AdamW on the float32 weight `param` (contiguous, as its moments, EMAs and copy)
    with `grad` (any float dtype), then each EMA set of `emas` (at most two) toward the new
    weight with its decay, then `copy` (the weight's compute copy) from it. scalars: a float32
    device tensor (lr, 1/(1 - β1^step), 1/sqrt(1 - β2^step))."""
    if not use_kernel(param):
        return ref.adamw_ema_(param, grad, exp_avg, exp_avg_sq, scalars, betas, eps,
                              weight_decay, emas, decays, copy)
    (ema1, ema2), (decay1, decay2) = [*emas, None, None][:2], [*decays, 0.0, 0.0][:2]
    adamw_ema_op(param, grad, exp_avg, exp_avg_sq, scalars, float(betas[0]), float(betas[1]),
                 float(eps), float(weight_decay), ema1, float(decay1), ema2, float(decay2), copy)
