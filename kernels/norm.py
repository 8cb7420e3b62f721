"""Gated residual + RMSNorm + adaLN modulation in one pass over the residual stream.

One op, ``jitfast::residual_norm``, covers the four forms the block uses; which inputs are
present picks the form (constexpr flags compile one kernel per form):

    rms_norm                          u = w·n(x)                            (no gate, no shift)
    rms_norm_modulate                 u = w·n(x)·(1 + sc) + sh              (no gate)
    gated_residual                    x' = x + g·h                          (no weight)
    gated_residual_rms_norm_modulate  x' = x + g·h, u = w·n(x')·(1 + sc) + sh

with n(x) = x·rstd, rstd = 1/sqrt(mean(x²) + eps), all in float32; g, sh, sc are per sample,
(B, D).
The forward saves rstd per row; the backward recomputes n(x) from it and reduces the weight,
shift, scale and gate grads over rows in per-chunk partial sums.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast import ops as ref

from ._common import block, empty, row_split, use_kernel


@triton.jit
def _residual_norm_fwd(X, H, G, W, SH, SC, XN, U, RSTD, n_tok, D, eps,
                       HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sample = row // n_tok
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(G + sample * D + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + g * h).to(XN.dtype.element_ty)
        tl.store(XN + row * D + cols, x_new, mask=mask)
        x = x_new.to(tl.float32)  # normalise what was stored, as the reference does
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        u = x * rstd * w
        if HAS_MOD:
            sh = tl.load(SH + sample * D + cols, mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(SC + sample * D + cols, mask=mask, other=0.0).to(tl.float32)
            u = u * (1.0 + sc) + sh
        tl.store(U + row * D + cols, u, mask=mask)
        tl.store(RSTD + row, rstd)


@triton.jit
def _residual_norm_bwd(DXN, DU, XN, H, G, W, SC, RSTD, DX, DH, DW_PART, DSH_PART, DSC_PART,
                       DG_PART, n_tok, D, rows_per_chunk,
                       HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Program (sample, chunk) handles rows_per_chunk tokens of one sample and writes its
    partial sums of the weight / shift / scale / gate grads to row (sample, chunk)."""
    sample = tl.program_id(0).to(tl.int64)
    part = sample * tl.num_programs(1) + tl.program_id(1)
    start = tl.program_id(1) * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_tok)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw, dsh, dsc, dg = zeros, zeros, zeros, zeros
    if HAS_NORM:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            sc = tl.load(SC + sample * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(G + sample * D + cols, mask=mask, other=0.0).to(tl.float32)
    for t in range(start, end):
        offs = (sample * n_tok + t) * D + cols
        dx = zeros
        if HAS_NORM:
            rstd = tl.load(RSTD + sample * n_tok + t)
            x_hat = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            du = tl.load(DU + offs, mask=mask, other=0.0).to(tl.float32)
            dy = du
            if HAS_MOD:
                dsh += du
                dsc += du * w * x_hat
                dy = du * (1.0 + sc)
            dw += dy * x_hat
            dx_hat = dy * w
            dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / D))
        if HAS_GATE:
            dx += tl.load(DXN + offs, mask=mask, other=0.0).to(tl.float32)
            dg += dx * tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + offs, dx * g, mask=mask)
        tl.store(DX + offs, dx, mask=mask)
    if HAS_NORM:
        tl.store(DW_PART + part * D + cols, dw, mask=mask)
        if HAS_MOD:
            tl.store(DSH_PART + part * D + cols, dsh, mask=mask)
            tl.store(DSC_PART + part * D + cols, dsc, mask=mask)
    if HAS_GATE:
        tl.store(DG_PART + part * D + cols, dg, mask=mask)


def _launch_args(x, h, weight, shift):
    """(rows, n_tok, D, flags) of a call: per-sample inputs index rows of (B, N, D)."""
    D = x.shape[-1]
    rows = x.numel() // D
    per_sample = h is not None or shift is not None
    n_tok = x.shape[-2] if per_sample else rows
    flags = dict(HAS_GATE=h is not None, HAS_NORM=weight is not None, HAS_MOD=shift is not None,
                 BLOCK_D=block(D, 1))
    return rows, n_tok, D, flags


def _contiguous(*tensors):
    return [t if t is None else t.contiguous() for t in tensors]


def _promoted(dtype, *tensors):
    """dtype promoted with those of the tensors given (None skipped), as elementwise ops do."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None],
                            dtype)


def _outputs(x, h, gate, weight, shift, scale):
    """Empty (x_new, u, rstd) in the reference's dtypes; empty(0) for what the form lacks."""
    new_dtype = _promoted(x.dtype, h, gate)
    x_new = x.new_empty(x.shape, dtype=new_dtype) if h is not None else empty(x)
    if weight is None:
        return x_new, empty(x), empty(x)
    u = x.new_empty(x.shape, dtype=_promoted(new_dtype, shift, scale))
    return x_new, u, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("jitfast::residual_norm", mutates_args=())
def residual_norm(x: torch.Tensor, h: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                  weight: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  scale: Optional[torch.Tensor], eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_new, u, rstd); the ones the form does not produce are empty."""
    x, h, gate, weight, shift, scale = _contiguous(x, h, gate, weight, shift, scale)
    rows, n_tok, D, flags = _launch_args(x, h, weight, shift)
    x_new, u, rstd = _outputs(x, h, gate, weight, shift, scale)
    _residual_norm_fwd[(rows,)](x, h, gate, weight, shift, scale, x_new, u, rstd, n_tok, D, eps,
                                **flags)
    return x_new, u, rstd


@residual_norm.register_fake
def _(x, h, gate, weight, shift, scale, eps):
    return _outputs(x, h, gate, weight, shift, scale)


def _grads(x_normed, *inputs):
    """Empty grads like x_normed and each of inputs; empty(0) for absent inputs."""
    return (torch.empty_like(x_normed),
            *(empty(x_normed) if t is None else torch.empty_like(t) for t in inputs))


@torch.library.custom_op("jitfast::residual_norm_backward", mutates_args=())
def residual_norm_backward(dx_new: torch.Tensor, du: torch.Tensor, x_normed: torch.Tensor,
                           h: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], rstd: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    """Grads (dx, dh, dgate, dweight, dshift, dscale), empty for absent inputs. x_normed is the
    tensor that was normalised: x_new for the gated form, else x."""
    tensors = _contiguous(dx_new, du, x_normed, h, gate, weight, shift, scale)
    dx_new, du, x_normed, h, gate, weight, shift, scale = tensors
    rows, n_tok, D, flags = _launch_args(x_normed, h, weight, shift)
    groups = rows // n_tok
    chunks, per_chunk = row_split(groups, n_tok, x_normed.device)
    part = x_normed.new_empty(4, groups, chunks, D, dtype=torch.float32)
    dx, dh, dgate, dweight, dshift, dscale = _grads(x_normed, h, gate, weight, shift, scale)
    _residual_norm_bwd[(groups, chunks)](dx_new, du, x_normed, h, gate, weight, scale, rstd, dx,
                                         dh, part[0], part[1], part[2], part[3], n_tok, D,
                                         per_chunk, **flags)
    for grad, partial, dims in ((dweight, part[0], (0, 1)), (dshift, part[1], 1),
                                (dscale, part[2], 1), (dgate, part[3], 1)):
        if grad.numel():
            grad.copy_(partial.sum(dims))
    return dx, dh, dgate, dweight, dshift, dscale


@residual_norm_backward.register_fake
def _(dx_new, du, x_normed, h, gate, weight, shift, scale, rstd):
    return _grads(x_normed, h, gate, weight, shift, scale)


def _setup_context(ctx, inputs, output):
    x, h, gate, weight, shift, scale, _ = inputs
    x_new, _, rstd = output
    ctx.save_for_backward(x_new if h is not None else x, h, gate, weight, shift, scale, rstd)


def _backward_fn(ctx, dx_new, du, _):
    x_normed, h, gate, weight, shift, scale, rstd = ctx.saved_tensors
    dx, dh, dgate, dweight, dshift, dscale = residual_norm_backward(
        dx_new, du, x_normed, h, gate, weight, shift, scale, rstd)
    inputs, grads = (h, gate, weight, shift, scale), (dh, dgate, dweight, dshift, dscale)
    return dx, *(None if t is None else g for t, g in zip(inputs, grads)), None


residual_norm.register_autograd(_backward_fn, setup_context=_setup_context)


def rms_norm(x, weight, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.rms_norm(x, weight, eps)
    return residual_norm(x, None, None, weight, None, None, eps)[1]


def rms_norm_modulate(x, weight, shift, scale, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.rms_norm_modulate(x, weight, shift, scale, eps)
    return residual_norm(x, None, None, weight, shift, scale, eps)[1]


def gated_residual(x, h, gate):
    if not use_kernel(x):
        return ref.gated_residual(x, h, gate)
    return residual_norm(x, h, gate, None, None, None, ref.RMS_EPS)[0]


def gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps)
    x_new, u, _ = residual_norm(x, h, gate, weight, shift, scale, eps)
    return x_new, u
