"""Gated residual + RMSNorm + adaLN modulation in one pass over the residual stream.

One op, ``jitfast::residual_norm``, covers the four forms the block uses; which inputs are
present picks the form (constexpr flags compile one kernel per form):

    rms_norm                          u = w·n(x)                            (no gate, no shift)
    rms_norm_modulate                 u = w·n(x)·(1 + sc) + sh              (no gate)
    gated_residual                    x' = x + g·(h + b)                    (no weight)
    gated_residual_rms_norm_modulate  x' = x + g·(h + b), u = w·n(x')·(1 + sc) + sh

with n(x) = x·rstd, rstd = 1/sqrt(mean(x²) + eps), all in float32; g, sh, sc are per sample,
(B, D); b (D,) is the bias of the Linear that made h (which then runs without it: its bias
gradient comes from this op's backward, not from a pass over the Linear's output gradient). u
covers the tokens from `skip` on (the final layer drops the in-context tokens without a copy).

Under autocast u is written in autocast's dtype: every consumer of u is a matmul, which autocast
would feed it in that dtype anyway (the cast, and its backward, cost a round trip of u each).

The kernels work on 2-D tiles: BLOCK_M rows of one sample (grid axis 1; all rows form one
"sample" in the forms without per-sample inputs) by the whole row, BLOCK_D = next_pow2(D) lanes,
masked. A forward program normalises one tile and saves rstd per row. A backward program takes a
contiguous run of its sample's tiles (program_tiles), recomputes n(x) from rstd, and reduces the
weight, shift, scale, gate and bias grads over each tile's rows (tl.sum over axis 0) into one
partial row per program; one more kernel sums the partial rows into the grads. The tile's size
in elements is autotuned (TILE); BLOCK_M follows from it (tile_rows).
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autocast_dtype, autotune, block, empty, program_tiles, reduction_programs,
                      row_bucket, tile_rows, use_kernel)

# (TILE, num_warps): 8 to 32 elements of a tile per thread (the backward keeps about twice as many
# tiles live, hence half the sizes). At D = 768 (BLOCK_D 1024) a forward tile has 2 to 8 rows and
# a backward one 1 to 4; at D = 1664 (2048) half as many, at least one.
FWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((4096, 4), (2048, 4), (4096, 8), (8192, 8))]
BWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((2048, 4), (1024, 4), (2048, 8), (4096, 8))]
KEY = ["D", "HAS_GATE", "HAS_NORM", "HAS_MOD"]
# the partial sums of the backward: weight, h's bias (summed over every program), shift, scale,
# gate (summed over each sample's programs)
PARTS = 5


@triton.jit
def _norm_tile(sample, tile, n_tok, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile `tile` of the rows of `sample`: the rows' token indices within the sample, their
    indices into the (rows, D) tensors and their mask (BLOCK_M,), then the element offsets and
    mask of the (BLOCK_M, BLOCK_D) tile."""
    t = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = sample * n_tok + t
    cols = tl.arange(0, BLOCK_D)[None, :]
    return t, rows, t < n_tok, rows[:, None] * D + cols, (t < n_tok)[:, None] & (cols < D)


@triton.jit
def _vector(PTR, D, BLOCK_D: tl.constexpr):
    """The D floats at PTR (the weight, or one sample's gate / shift / scale) as a (1, BLOCK_D)
    row in float32, zero beyond D."""
    cols = tl.arange(0, BLOCK_D)[None, :]
    return tl.load(PTR + cols, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _h_plus_bias(H, HB, offs, mask, D, HAS_H_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of h, plus its Linear's bias when there is one, in float32."""
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_H_BIAS:
        h += _vector(HB, D, BLOCK_D)
    return h


@autotune(FWD_CONFIGS, key=[*KEY, "TANGENT"])
@tile_rows("BLOCK_D")
@triton.jit
def _residual_norm_fwd(X, H, HB, G, W, SH, SC, XN, U, RSTD, TX, TH, TXN, TU, n_tok, skip, D, s_g,
                       s_sh, s_sc, eps, ROW_BUCKET, HAS_GATE: tl.constexpr,
                       HAS_H_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
                       TANGENT: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    """Program (tile, sample) handles BLOCK_M rows of one sample (TILE only sets BLOCK_M). With
    TANGENT it also carries the tangents TX, TH of x and h to those of x' (TXN) and u (TU)."""
    sample = tl.program_id(1).to(tl.int64)
    t, rows, row_mask, offs, mask = _norm_tile(sample, tl.program_id(0), n_tok, D, BLOCK_M,
                                               BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if TANGENT:
        tx = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = _vector(G + sample * s_g, D, BLOCK_D)
        h = _h_plus_bias(H, HB, offs, mask, D, HAS_H_BIAS, BLOCK_D)
        x_new = (x + g * h).to(XN.dtype.element_ty)
        tl.store(XN + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)  # normalise what was stored, as the reference does
        if TANGENT:
            tx += g * tl.load(TH + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(TXN + offs, tx, mask=mask)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = _vector(W, D, BLOCK_D)
        u = x * rstd[:, None] * w
        if TANGENT:
            x_hat = x * rstd[:, None]
            tu = w * rstd[:, None] * (tx - x_hat * (tl.sum(x_hat * tx, axis=1) / D)[:, None])
        if HAS_MOD:
            scale = _vector(SC + sample * s_sc, D, BLOCK_D)
            u = u * (1.0 + scale) + _vector(SH + sample * s_sh, D, BLOCK_D)
            if TANGENT:
                tu = tu * (1.0 + scale)
        normed = row_mask & (t >= skip)
        out_rows = sample * (n_tok - skip) + t - skip
        cols = tl.arange(0, BLOCK_D)[None, :]
        out = out_rows[:, None] * D + cols
        tl.store(U + out, u, mask=normed[:, None] & (cols < D))
        tl.store(RSTD + out_rows, rstd, mask=normed)
        if TANGENT:
            tl.store(TU + out, tu, mask=normed[:, None] & (cols < D))


@autotune(BWD_CONFIGS, key=KEY)
@tile_rows("BLOCK_D")
@triton.jit
def _residual_norm_bwd(DXN, DU, XN, H, HB, G, W, SC, RSTD, DX, DH, PART, n_tok, skip, D, s_g,
                       s_sc, ROW_BUCKET, HAS_GATE: tl.constexpr, HAS_H_BIAS: tl.constexpr,
                       HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr, HAS_DXN: tl.constexpr,
                       STORE_DX: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    """Program (chunk, sample) handles a run of its sample's tiles and writes its partial sums of
    the weight / bias / shift / scale / gate grads to row (sample, chunk) of PART[0..4]."""
    sample = tl.program_id(1).to(tl.int64)
    first, last = program_tiles(n_tok, BLOCK_M)
    zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw, dsum, dsh, dsc, dg = zeros, zeros, zeros, zeros, zeros
    cols = tl.arange(0, BLOCK_D)[None, :]
    if HAS_NORM:
        w = _vector(W, D, BLOCK_D)
        if HAS_MOD:
            sc = _vector(SC + sample * s_sc, D, BLOCK_D)
    if HAS_GATE:
        g = _vector(G + sample * s_g, D, BLOCK_D)
    for tile in tl.range(first, last, num_stages=2):  # loads the next tile during this one
        t, rows, row_mask, offs, mask = _norm_tile(sample, tile, n_tok, D, BLOCK_M, BLOCK_D)
        dx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            normed = row_mask & (t >= skip)
            out_rows = sample * (n_tok - skip) + t - skip
            rstd = tl.load(RSTD + out_rows, mask=normed, other=0.0)[:, None]
            x_hat = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            du = tl.load(DU + out_rows[:, None] * D + cols, mask=normed[:, None] & (cols < D),
                         other=0.0).to(tl.float32)
            dy = du
            if HAS_MOD:
                dsh += tl.sum(du, axis=0)
                dsc += tl.sum(du * w * x_hat, axis=0)
                dy = du * (1.0 + sc)
            dw += tl.sum(dy * x_hat, axis=0)
            dx_hat = dy * w
            dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
        if HAS_GATE:
            if HAS_DXN:
                dx += tl.load(DXN + offs, mask=mask, other=0.0).to(tl.float32)
            dg += tl.sum(dx * _h_plus_bias(H, HB, offs, mask, D, HAS_H_BIAS, BLOCK_D), axis=0)
            dsum += tl.sum(dx, axis=0)
            tl.store(DH + offs, dx * g, mask=mask)
        if STORE_DX:
            tl.store(DX + offs, dx, mask=mask)
    part = PART + (sample * tl.num_programs(0) + tl.program_id(0)) * D + tl.arange(0, BLOCK_D)
    stride = tl.num_programs(0) * tl.num_programs(1) * D  # between PART's five planes
    lanes = tl.arange(0, BLOCK_D) < D
    if HAS_NORM:
        tl.store(part, dw, mask=lanes)
        if HAS_MOD:
            tl.store(part + 2 * stride, dsh, mask=lanes)
            tl.store(part + 3 * stride, dsc, mask=lanes)
    if HAS_GATE:
        if HAS_H_BIAS:
            tl.store(part + stride, dsum * tl.reshape(g, [BLOCK_D]), mask=lanes)
        tl.store(part + 4 * stride, dg, mask=lanes)


@triton.jit
def _residual_norm_sums_bwd(PART, DW, DB, DSH, DSC, DG, groups, chunks, D, s_sh, s_sc, s_g,
                            HAS_NORM: tl.constexpr, HAS_H_BIAS: tl.constexpr,
                            HAS_MOD: tl.constexpr, HAS_GATE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The grads from the backward's partial rows PART (5, groups, chunks, D), in one launch:
    program (columns, g, plane) with g < groups sums sample g's chunks of plane 2, 3 or 4 into
    its shift, scale or gate grad; with g == groups, every row of plane 0 or 1 into the weight's
    or the bias's grad. The other programs, and those of planes the form lacks (left unwritten
    by the backward), have nothing to do."""
    g = tl.program_id(1)
    plane = tl.program_id(2)
    per_sample = plane >= 2
    wanted = (((plane == 0) & HAS_NORM) | ((plane == 1) & HAS_H_BIAS)
              | ((plane == 2) & HAS_MOD) | ((plane == 3) & HAS_MOD) | ((plane == 4) & HAS_GATE))
    if wanted & (per_sample != (g == groups)):
        cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        lanes = cols < D
        n = tl.where(per_sample, chunks, groups * chunks)
        first = tl.where(per_sample, g * chunks, 0).to(tl.int64)
        base = PART + (plane * groups * chunks + first) * D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(0, n, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)[:, None]
            acc += tl.sum(tl.load(base + r * D + cols[None, :], mask=(r < n) & lanes[None, :],
                                  other=0.0), axis=0)
        if HAS_NORM:
            if plane == 0:
                tl.store(DW + cols, acc, mask=lanes)
            if HAS_MOD:
                if plane == 2:
                    tl.store(DSH + g * s_sh + cols, acc, mask=lanes)
                if plane == 3:
                    tl.store(DSC + g * s_sc + cols, acc, mask=lanes)
        if HAS_GATE:
            if HAS_H_BIAS:
                if plane == 1:
                    tl.store(DB + cols, acc, mask=lanes)
            if plane == 4:
                tl.store(DG + g * s_g + cols, acc, mask=lanes)


SUM_BLOCK_D = 128


def _launch_args(x, h, h_bias, weight, shift):
    """(groups, n_tok, D, flags) of a call: groups runs of n_tok rows of D, the samples of
    (B, N, D) where per-sample inputs index them, else all rows as one group; flags are the
    kernels' other keyword arguments."""
    D = x.shape[-1]
    rows = x.numel() // D
    per_sample = h is not None or shift is not None
    n_tok = x.shape[-2] if per_sample else rows
    flags = dict(HAS_GATE=h is not None, HAS_H_BIAS=h_bias is not None,
                 HAS_NORM=weight is not None, HAS_MOD=shift is not None,
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


def _outputs(x, h, gate, h_bias, weight, shift, scale, skip, u_dtype):
    """Empty (x_new, u, rstd) in the reference's dtypes (u in u_dtype if given; x_new in those of
    x, h and gate, not h_bias's: see ref.gated_residual); empty(0) for what the form lacks."""
    new_dtype = _promoted(x.dtype, h, gate)
    x_new = x.new_empty(x.shape, dtype=new_dtype) if h is not None else empty(x)
    if weight is None:
        return x_new, empty(x), empty(x)
    shape = (*x.shape[:-2], x.shape[-2] - skip, x.shape[-1])
    u = x.new_empty(shape, dtype=u_dtype or _promoted(new_dtype, shift, scale))
    return x_new, u, x.new_empty(shape[:-1], dtype=torch.float32)


def _forward(x, h, gate, h_bias, weight, shift, scale, eps, skip, u_dtype, tx=None, th=None):
    """(x_new, u, rstd), and with the tangent tx (and th) of x (and h) also theirs of x_new and
    u (float32; u's in u's dtype); empty where the form lacks them."""
    x, h, h_bias, weight, tx, th = _contiguous(x, h, h_bias, weight, tx, th)
    (gate, shift, scale), strides = _per_sample(gate, shift, scale)
    groups, n_tok, D, flags = _launch_args(x, h, h_bias, weight, shift)
    x_new, u, rstd = _outputs(x, h, gate, h_bias, weight, shift, scale, skip, u_dtype)
    tangents = ()
    if tx is not None:
        tangents = _tangents(x, h, u, tx, th)
    _residual_norm_fwd[lambda meta: (triton.cdiv(n_tok, meta["BLOCK_M"]), groups)](
        x, h, h_bias, gate, weight, shift, scale, x_new, u, rstd, tx, th,
        *(tangents or (None, None)), n_tok, skip, D, *strides, eps, TANGENT=tx is not None,
        **flags)
    return (x_new, u, rstd, *tangents)


def _tangents(x, h, u, tx, th):
    """Empty tangents of (x_new, u): float32, and u's dtype; empty(0) where the form lacks it."""
    tx_new = torch.empty_like(tx, dtype=torch.float32) if h is not None else empty(x)
    return tx_new, torch.empty_like(u) if u.numel() else empty(x)


@torch.library.custom_op("jitfast::residual_norm", mutates_args=())
def residual_norm(x: torch.Tensor, h: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                  h_bias: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                  shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
                  skip: int, u_dtype: Optional[torch.dtype]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_new, u, rstd); the ones the form does not produce are empty. u and rstd cover
    the tokens from `skip` on."""
    return _forward(x, h, gate, h_bias, weight, shift, scale, eps, skip, u_dtype)


@torch.library.custom_op("jitfast::residual_norm_dual", mutates_args=())
def residual_norm_dual(x: torch.Tensor, h: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                       h_bias: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
                       skip: int, u_dtype: Optional[torch.dtype], tx: torch.Tensor,
                       th: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """``residual_norm`` with the tangents tx, th of x and h carried in the same pass: returns
    (x_new, u, rstd, tx_new, tu). Gradients flow through x_new and u only (the tangents are
    stop-gradient where pMF uses them)."""
    return _forward(x, h, gate, h_bias, weight, shift, scale, eps, skip, u_dtype, tx, th)


@residual_norm_dual.register_fake
def _(x, h, gate, h_bias, weight, shift, scale, eps, skip, u_dtype, tx, th):
    x_new, u, rstd = _outputs(x, h, gate, h_bias, weight, shift, scale, skip, u_dtype)
    return (x_new, u, rstd, *_tangents(x, h, u, tx, th))


@residual_norm.register_fake
def _(x, h, gate, h_bias, weight, shift, scale, eps, skip, u_dtype):
    return _outputs(x, h, gate, h_bias, weight, shift, scale, skip, u_dtype)


def _grads(x_normed, needs_dx, *inputs):
    """Empty grads like x_normed (empty(0) unless needs_dx) and each of inputs; empty(0) for
    absent inputs."""
    return (torch.empty_like(x_normed) if needs_dx else empty(x_normed),
            *(empty(x_normed) if t is None else torch.empty_like(t) for t in inputs))


@torch.library.custom_op("jitfast::residual_norm_backward", mutates_args=())
def residual_norm_backward(dx_new: Optional[torch.Tensor], du: Optional[torch.Tensor],
                           x_normed: torch.Tensor, h: Optional[torch.Tensor],
                           gate: Optional[torch.Tensor], h_bias: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], rstd: torch.Tensor, skip: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (dx, dh, dgate, dh_bias, dweight, dshift, dscale), empty for absent inputs; dx_new
    or du None where that output got no grad. x_normed is the tensor that was normalised: x_new
    for the gated form, else x. dx of the gated form without a norm is dx_new itself, which the
    caller passes on: it comes back empty."""
    dx_new, du, x_normed, h, h_bias, weight = _contiguous(dx_new, du, x_normed, h, h_bias,
                                                         weight)
    (gate, shift, scale), (s_g, _, s_sc) = _per_sample(gate, shift, scale)
    if weight is not None and du is None:  # u unused: its grad is zero
        du = x_normed.new_zeros(rstd.shape + x_normed.shape[-1:])
    groups, n_tok, D, flags = _launch_args(x_normed, h, h_bias, weight, shift)
    chunks = reduction_programs(groups, n_tok, x_normed.device)
    part = x_normed.new_empty(PARTS, groups, chunks, D, dtype=torch.float32)
    store_dx = weight is not None
    dx, dh, dgate, dh_bias, dweight, dshift, dscale = _grads(x_normed, store_dx, h, gate, h_bias,
                                                             weight, shift, scale)
    _residual_norm_bwd[(chunks, groups)](dx_new, du, x_normed, h, h_bias, gate, weight, scale,
                                         rstd, dx, dh, part, n_tok, skip, D, s_g, s_sc,
                                         HAS_DXN=dx_new is not None, STORE_DX=store_dx, **flags)
    if any(g.numel() for g in (dweight, dh_bias, dshift, dscale, dgate)):
        sums = {k: flags[k] for k in ("HAS_NORM", "HAS_H_BIAS", "HAS_MOD", "HAS_GATE")}
        _residual_norm_sums_bwd[(triton.cdiv(D, SUM_BLOCK_D), groups + 1, PARTS)](
            part, dweight, dh_bias, dshift, dscale, dgate, groups, chunks, D,
            *(g.stride(0) if g.numel() else 0 for g in (dshift, dscale, dgate)), **sums,
            BLOCK_R=16, BLOCK_D=SUM_BLOCK_D)
    return dx, dh, dgate, dh_bias, dweight, dshift, dscale


@residual_norm_backward.register_fake
def _(dx_new, du, x_normed, h, gate, h_bias, weight, shift, scale, rstd, skip):
    return _grads(x_normed, weight is not None, h, gate, h_bias, weight, shift, scale)


def _setup_context(ctx, inputs, output):
    x, h, gate, h_bias, weight, shift, scale, _, skip, _ = inputs[:10]
    x_new, _, rstd = output[:3]
    ctx.skip = skip
    if len(output) > 3:
        ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)  # no zero-filled grads for outputs nothing used
    ctx.save_for_backward(x_new if h is not None else x, h, gate, h_bias, weight, shift, scale,
                          rstd)


def _backward_fn(ctx, dx_new, du, _):
    x_normed, h, gate, h_bias, weight, shift, scale, rstd = ctx.saved_tensors
    dx, dh, dgate, dh_bias, dweight, dshift, dscale = residual_norm_backward(
        dx_new, du, x_normed, h, gate, h_bias, weight, shift, scale, rstd, ctx.skip)
    if weight is None:  # x_new = x + g·h: x's grad is x_new's
        dx = dx_new
    inputs = (h, gate, h_bias, weight, shift, scale)
    grads = (dh, dgate, dh_bias, dweight, dshift, dscale)
    return dx, *(None if t is None else g for t, g in zip(inputs, grads)), None, None, None


residual_norm.register_autograd(_backward_fn, setup_context=_setup_context)


def _dual_backward_fn(ctx, dx_new, du, _, _tx_new, _tu):
    return *_backward_fn(ctx, dx_new, du, None), None, None


residual_norm_dual.register_autograd(_dual_backward_fn, setup_context=_setup_context)


def _u_dtype(x):
    """The dtype u is written in: autocast's when it is on for x's device (see the docstring)."""
    return autocast_dtype(x.device.type)


def rms_norm(x, weight, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.rms_norm(x, weight, eps)
    return residual_norm(x, None, None, None, weight, None, None, eps, 0, _u_dtype(x))[1]


def rms_norm_modulate(x, weight, shift, scale, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.rms_norm_modulate(x, weight, shift, scale, eps)
    return residual_norm(x, None, None, None, weight, shift, scale, eps, 0, _u_dtype(x))[1]


def gated_residual(x, h, gate, h_bias=None):
    if not use_kernel(x):
        return ref.gated_residual(x, h, gate, h_bias)
    return residual_norm(x, h, gate, h_bias, None, None, None, ref.RMS_EPS, 0, None)[0]


def gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps=ref.RMS_EPS,
                                     h_bias=None, skip=0):
    if not use_kernel(x):
        return ref.gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps, h_bias,
                                                    skip)
    x_new, u, _ = residual_norm(x, h, gate, h_bias, weight, shift, scale, eps, skip, _u_dtype(x))
    return x_new, u


def rms_norm_modulate_dual(x, weight, shift, scale, tx, eps=ref.RMS_EPS):
    if not use_kernel(x):
        return ref.rms_norm_modulate_dual(x, weight, shift, scale, tx, eps)
    _, u, _, _, tu = residual_norm_dual(x, None, None, None, weight, shift, scale, eps, 0,
                                        _u_dtype(x), tx, None)
    return u, tu


def gated_residual_dual(x, h, gate, tx, th, h_bias=None):
    if not use_kernel(x):
        return ref.gated_residual_dual(x, h, gate, tx, th, h_bias)
    x_new, _, _, tx_new, _ = residual_norm_dual(x, h, gate, h_bias, None, None, None,
                                                ref.RMS_EPS, 0, None, tx, th)
    return x_new, tx_new


def gated_residual_rms_norm_modulate_dual(x, h, gate, weight, shift, scale, tx, th,
                                          eps=ref.RMS_EPS, h_bias=None, skip=0):
    if not use_kernel(x):
        return ref.gated_residual_rms_norm_modulate_dual(x, h, gate, weight, shift, scale, tx, th,
                                                         eps, h_bias, skip)
    x_new, u, _, tx_new, tu = residual_norm_dual(x, h, gate, h_bias, weight, shift, scale, eps,
                                                 skip, _u_dtype(x), tx, th)
    return x_new, u, tx_new, tu
