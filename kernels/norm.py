"""Gated residual + RMSNorm + adaLN modulation in one pass over the residual stream.

One op, ``jitfast::residual_norm``, covers the four forms the block uses; which inputs are
present picks the form (constexpr flags compile one kernel per form):

    rms_norm                          u = w·n(x)                            (no gate, no shift)
    rms_norm_modulate                 u = w·n(x)·(1 + sc) + sh              (no gate)
    gated_residual                    x' = x + g·h                          (no weight)
    gated_residual_rms_norm_modulate  x' = x + g·h, u = w·n(x')·(1 + sc) + sh

with n(x) = x·rstd, rstd = 1/sqrt(mean(x²) + eps), all in float32; g, sh, sc are per sample,
(B, D).

The kernels work on 2-D tiles: BLOCK_M rows of one sample (grid axis 1; all rows form one
"sample" in the forms without per-sample inputs) by the whole row, BLOCK_D = next_pow2(D) lanes,
masked. A forward program normalises one tile and saves rstd per row. A backward program takes a
contiguous run of its sample's tiles (program_tiles), recomputes n(x) from rstd, and reduces the
weight, shift, scale and gate grads over each tile's rows (tl.sum over axis 0) into one partial
row per program, summed afterwards. The tile's size in elements is autotuned (TILE); BLOCK_M
follows from it (tile_rows).
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autotune, block, empty, program_tiles, reduction_programs, row_bucket,
                      tile_rows, use_kernel)

# (TILE, num_warps): 8 to 32 elements of a tile per thread (the backward keeps about twice as many
# tiles live, hence half the sizes). At D = 768 (BLOCK_D 1024) a forward tile has 2 to 8 rows and
# a backward one 1 to 4; at D = 1664 (2048) half as many, at least one.
FWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((4096, 4), (2048, 4), (4096, 8), (8192, 8))]
BWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((2048, 4), (1024, 4), (2048, 8), (4096, 8))]
KEY = ["D", "HAS_GATE", "HAS_NORM", "HAS_MOD"]


@triton.jit
def _norm_tile(sample, tile, n_tok, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile `tile` of the rows of `sample`: the rows' indices into the (rows, D) tensors and their
    mask (BLOCK_M,), then the element offsets and mask of the (BLOCK_M, BLOCK_D) tile."""
    t = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = sample * n_tok + t
    cols = tl.arange(0, BLOCK_D)[None, :]
    return rows, t < n_tok, rows[:, None] * D + cols, (t < n_tok)[:, None] & (cols < D)


@triton.jit
def _vector(PTR, D, BLOCK_D: tl.constexpr):
    """The D floats at PTR (the weight, or one sample's gate / shift / scale) as a (1, BLOCK_D)
    row in float32, zero beyond D."""
    cols = tl.arange(0, BLOCK_D)[None, :]
    return tl.load(PTR + cols, mask=cols < D, other=0.0).to(tl.float32)


@autotune(FWD_CONFIGS, key=KEY)
@tile_rows("BLOCK_D")
@triton.jit
def _residual_norm_fwd(X, H, G, W, SH, SC, XN, U, RSTD, n_tok, D, s_g, s_sh, s_sc, eps,
                       ROW_BUCKET,
                       HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
                       BLOCK_D: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (tile, sample) handles BLOCK_M rows of one sample (TILE only sets BLOCK_M)."""
    sample = tl.program_id(1).to(tl.int64)
    rows, row_mask, offs, mask = _norm_tile(sample, tl.program_id(0), n_tok, D, BLOCK_M, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + _vector(G + sample * s_g, D, BLOCK_D) * h).to(XN.dtype.element_ty)
        tl.store(XN + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)  # normalise what was stored, as the reference does
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        u = x * rstd[:, None] * _vector(W, D, BLOCK_D)
        if HAS_MOD:
            scale = _vector(SC + sample * s_sc, D, BLOCK_D)
            u = u * (1.0 + scale) + _vector(SH + sample * s_sh, D, BLOCK_D)
        tl.store(U + offs, u, mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)


@autotune(BWD_CONFIGS, key=KEY)
@tile_rows("BLOCK_D")
@triton.jit
def _residual_norm_bwd(DXN, DU, XN, H, G, W, SC, RSTD, DX, DH, DW_PART, DSH_PART, DSC_PART,
                       DG_PART, n_tok, D, s_g, s_sc, ROW_BUCKET,
                       HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
                       BLOCK_D: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (chunk, sample) handles a run of its sample's tiles and writes its partial sums of
    the weight / shift / scale / gate grads to row (sample, chunk)."""
    sample = tl.program_id(1).to(tl.int64)
    first, last = program_tiles(n_tok, BLOCK_M)
    zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw, dsh, dsc, dg = zeros, zeros, zeros, zeros
    if HAS_NORM:
        w = _vector(W, D, BLOCK_D)
        if HAS_MOD:
            sc = _vector(SC + sample * s_sc, D, BLOCK_D)
    if HAS_GATE:
        g = _vector(G + sample * s_g, D, BLOCK_D)
    for tile in tl.range(first, last, num_stages=2):  # loads the next tile during this one
        rows, row_mask, offs, mask = _norm_tile(sample, tile, n_tok, D, BLOCK_M, BLOCK_D)
        dx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            x_hat = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            du = tl.load(DU + offs, mask=mask, other=0.0).to(tl.float32)
            dy = du
            if HAS_MOD:
                dsh += tl.sum(du, axis=0)
                dsc += tl.sum(du * w * x_hat, axis=0)
                dy = du * (1.0 + sc)
            dw += tl.sum(dy * x_hat, axis=0)
            dx_hat = dy * w
            dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
        if HAS_GATE:
            dx += tl.load(DXN + offs, mask=mask, other=0.0).to(tl.float32)
            dg += tl.sum(dx * tl.load(H + offs, mask=mask, other=0.0).to(tl.float32), axis=0)
            tl.store(DH + offs, dx * g, mask=mask)
        tl.store(DX + offs, dx, mask=mask)
    cols = tl.arange(0, BLOCK_D)
    part = (sample * tl.num_programs(0) + tl.program_id(0)) * D + cols
    if HAS_NORM:
        tl.store(DW_PART + part, dw, mask=cols < D)
        if HAS_MOD:
            tl.store(DSH_PART + part, dsh, mask=cols < D)
            tl.store(DSC_PART + part, dsc, mask=cols < D)
    if HAS_GATE:
        tl.store(DG_PART + part, dg, mask=cols < D)


def _launch_args(x, h, weight, shift):
    """(groups, n_tok, D, flags) of a call: groups runs of n_tok rows of D, the samples of
    (B, N, D) where per-sample inputs index them, else all rows as one group; flags are the
    kernels' other keyword arguments."""
    D = x.shape[-1]
    rows = x.numel() // D
    per_sample = h is not None or shift is not None
    n_tok = x.shape[-2] if per_sample else rows
    flags = dict(HAS_GATE=h is not None, HAS_NORM=weight is not None, HAS_MOD=shift is not None,
                 ROW_BUCKET=row_bucket(rows), BLOCK_D=block(D, 1))
    return rows // max(n_tok, 1), n_tok, D, flags


def _contiguous(*tensors):
    return [t if t is None else t.contiguous() for t in tensors]


def _per_sample(*vectors):
    """The per-sample (B, D) vectors with contiguous rows, and each one's row stride (0 if
    absent). Rows of a larger tensor stay views: the block's gate, shift and scale are chunks of
    its (B, 6D) modulation, and copying them cost 6 small kernels per block and evaluation."""
    vectors = [v if v is None or v.stride(-1) == 1 else v.contiguous() for v in vectors]
    return vectors, [0 if v is None else v.stride(0) for v in vectors]


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
    x, h, weight = _contiguous(x, h, weight)
    (gate, shift, scale), strides = _per_sample(gate, shift, scale)
    groups, n_tok, D, flags = _launch_args(x, h, weight, shift)
    x_new, u, rstd = _outputs(x, h, gate, weight, shift, scale)
    _residual_norm_fwd[lambda meta: (triton.cdiv(n_tok, meta["BLOCK_M"]), groups)](
        x, h, gate, weight, shift, scale, x_new, u, rstd, n_tok, D, *strides, eps, **flags)
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
    dx_new, du, x_normed, h, weight = _contiguous(dx_new, du, x_normed, h, weight)
    (gate, shift, scale), (s_g, _, s_sc) = _per_sample(gate, shift, scale)
    groups, n_tok, D, flags = _launch_args(x_normed, h, weight, shift)
    chunks = reduction_programs(groups, n_tok, x_normed.device)
    part = x_normed.new_empty(4, groups, chunks, D, dtype=torch.float32)
    dx, dh, dgate, dweight, dshift, dscale = _grads(x_normed, h, gate, weight, shift, scale)
    _residual_norm_bwd[(chunks, groups)](dx_new, du, x_normed, h, gate, weight, scale, rstd, dx,
                                         dh, part[0], part[1], part[2], part[3], n_tok, D,
                                         s_g, s_sc, **flags)
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
