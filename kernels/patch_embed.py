"""Bottleneck patch embedding in one kernel: patches gathered straight from the NCHW image, both
matmuls (C·p² → bottleneck → D), bias and position table; the bottleneck activation stays in
registers.

For training, the image may be given as the clean images x, the standard-normal noise and the
times t: the kernel forms the noisy input z = t·x + (1 - t)·s·noise as it gathers each patch (s,
the noise scale), so z never reaches memory.

The backward kernel recomputes the bottleneck h, forms dh = dout·W2 and scatters dx = dh·W1 back
to NCHW (and, for the noisy form, the grads of x and of the noise); it writes h, dh and the
gathered patch vectors (M × C·p², in the first matmul's dtype) so that the weight grads,
reductions over all tokens, are plain matmuls left to cuBLAS.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autocast_operands, autotune, block, dot_precision, empty, image_geometry,
                      patch_offsets, row_bucket, tile_grid, use_kernel, weight_grad)

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_J": 64, "BLOCK_D": 64}, num_warps=w)
           for m, w in ((32, 4), (64, 4), (64, 8))]


@triton.jit
def _patch_block(X, NOISE, T, noise_scale, tok, j, M, n_cols, n_tok, grid_w, p, channels,
                 s_b, s_c, s_h, s_w, NOISY: tl.constexpr):
    """Entries j (1, BLOCK_J) of the patch vectors of tokens tok (BLOCK_M, 1) in float32: of the
    image X, or with NOISY of z = t·X + (1 - t)·noise_scale·NOISE; then their offsets into the
    image and their mask."""
    offs = patch_offsets(tok, j, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, False)
    mask = (tok < M) & (j < n_cols)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISY:
        t = tl.load(T + tok // n_tok, mask=tok < M, other=0.0).to(tl.float32)
        noise = tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32)
        x = t * x + (1.0 - t) * (noise_scale * noise)
    return x, offs, mask


@triton.jit
def _bottleneck(X, NOISE, T, noise_scale, W1, Z, tok, kk, M, n_cols, K, n_tok, grid_w, p,
                channels, s_b, s_c, s_h, s_w, NOISY: tl.constexpr, STORE_Z: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_J: tl.constexpr):
    """h = patches(tok) · W1ᵀ (BLOCK_M, BLOCK_K) in float32, W1 (K, n_cols); with STORE_Z the
    patch vectors are also written to the rows tok of Z (M × n_cols), in W1's dtype."""
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for j0 in range(0, n_cols, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)[None, :]
        z, _, mask = _patch_block(X, NOISE, T, noise_scale, tok, j, M, n_cols, n_tok, grid_w, p,
                                  channels, s_b, s_c, s_h, s_w, NOISY)
        z = z.to(W1.dtype.element_ty)
        if STORE_Z:
            tl.store(Z + tok.to(tl.int64) * n_cols + j, z, mask=mask)
        w = tl.load(W1 + kk * n_cols + tl.trans(j), mask=(tl.trans(j) < n_cols) & (kk < K),
                    other=0.0)
        acc += tl.dot(z, w, input_precision=PRECISION)
    return acc


@autotune(CONFIGS, key=["n_cols", "K", "D", "NOISY", "TANGENT"])
@triton.jit
def _patch_embed_fwd(X, NOISE, T, noise_scale, W1, W2, B2, POS, OUT, TX, TOUT, M, n_cols, K, D,
                     n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                     NOISY: tl.constexpr, TANGENT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """With TANGENT also the embedding's tangent along the image TX (laid out as X): the same
    two matmuls, without bias or positions."""
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    kk = tl.arange(0, BLOCK_K)[None, :]
    h = _bottleneck(X, NOISE, T, noise_scale, W1, W1, tok, kk, M, n_cols, K, n_tok, grid_w, p,
                    channels, s_b, s_c, s_h, s_w, NOISY, False, PRECISION, BLOCK_M, BLOCK_K,
                    BLOCK_J)
    h = h.to(W2.dtype.element_ty)
    if TANGENT:
        th = _bottleneck(TX, TX, T, 0.0, W1, W1, tok, kk, M, n_cols, K, n_tok, grid_w, p,
                         channels, s_b, s_c, s_h, s_w, False, False, PRECISION, BLOCK_M,
                         BLOCK_K, BLOCK_J)
        th = th.to(W2.dtype.element_ty)
    k_col = tl.trans(kk)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)[None, :]
        w2 = tl.load(W2 + dd * K + k_col, mask=(k_col < K) & (dd < D), other=0.0)
        out = tl.dot(h, w2, input_precision=PRECISION)
        out += tl.load(B2 + dd, mask=dd < D, other=0.0).to(tl.float32)
        mask = (tok < M) & (dd < D)
        out += tl.load(POS + (tok % n_tok) * D + dd, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + tok.to(tl.int64) * D + dd, out, mask=mask)
        if TANGENT:
            tl.store(TOUT + tok.to(tl.int64) * D + dd, tl.dot(th, w2, input_precision=PRECISION),
                     mask=mask)


@autotune(CONFIGS, key=["n_cols", "K", "D", "NOISY"])
@triton.jit
def _patch_embed_bwd(X, NOISE, T, noise_scale, W1, W2, DOUT, H, DH, Z, DX, DNOISE, M, n_cols, K,
                     D, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                     NOISY: tl.constexpr, NEEDS_DX: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    kk = tl.arange(0, BLOCK_K)[None, :]
    k_col = tl.arange(0, BLOCK_K)[:, None]
    mask_h = (tok < M) & (kk < K)
    h = _bottleneck(X, NOISE, T, noise_scale, W1, Z, tok, kk, M, n_cols, K, n_tok, grid_w, p,
                    channels, s_b, s_c, s_h, s_w, NOISY, True, PRECISION, BLOCK_M, BLOCK_K,
                    BLOCK_J)
    tl.store(H + tok * K + kk, h, mask=mask_h)
    dh = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dout = tl.load(DOUT + tok.to(tl.int64) * D + dd[None, :],
                       mask=(tok < M) & (dd[None, :] < D), other=0.0)
        w2 = tl.load(W2 + dd[:, None] * K + kk, mask=(dd[:, None] < D) & (kk < K), other=0.0)
        dh += tl.dot(dout.to(W2.dtype.element_ty), w2, input_precision=PRECISION)
    tl.store(DH + tok * K + kk, dh, mask=mask_h)
    if NEEDS_DX:
        dh = dh.to(W1.dtype.element_ty)
        if NOISY:
            t = tl.load(T + tok // n_tok, mask=tok < M, other=0.0).to(tl.float32)
        for j0 in range(0, n_cols, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)[None, :]
            w1 = tl.load(W1 + k_col * n_cols + j, mask=(k_col < K) & (j < n_cols), other=0.0)
            dz = tl.dot(dh, w1, input_precision=PRECISION)
            offs = patch_offsets(tok, j, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, False)
            mask = (tok < M) & (j < n_cols)
            if NOISY:
                tl.store(DX + offs, t * dz, mask=mask)
                tl.store(DNOISE + offs, (1.0 - t) * noise_scale * dz, mask=mask)
            else:
                tl.store(DX + offs, dz, mask=mask)


def _out_dtype(x, w2, b2, pos, in_matmul_dtype=False):
    """The reference's: the matmuls run in x's dtype (w2's), then bias and table are added
    (promoting, unless in_matmul_dtype)."""
    if in_matmul_dtype:
        return w2.dtype
    return torch.promote_types(torch.promote_types(x.dtype, b2.dtype), pos.dtype)


def _shapes(x, w1):
    K = w1.shape[0]
    p = w1.shape[-1]
    return x.shape[0] * (x.shape[2] // p) * (x.shape[3] // p), w1[0].numel(), K, p


def _noisy_args(noise, t, noise_scale):
    """The kernels' (NOISE, T, noise_scale) arguments and NOISY flag."""
    return (noise, t, noise_scale), noise is not None


def _forward(x, w1, w2, b2, pos, noise, t, noise_scale, tx=None, in_matmul_dtype=False):
    """[out] of the embedding, and with the image's tangent tx [out, tout]."""
    x, w1, w2, b2, pos, noise, t, tx = (None if v is None else v.contiguous()
                                        for v in (x, w1, w2, b2, pos, noise, t, tx))
    M, n_cols, K, p = _shapes(x, w1)
    D = w2.shape[0]
    outputs = [x.new_empty(x.shape[0], M // x.shape[0], D,
                           dtype=_out_dtype(x, w2, b2, pos, in_matmul_dtype))
               for _ in range(1 if tx is None else 2)]
    noisy, noisy_flag = _noisy_args(noise, t, noise_scale)
    _patch_embed_fwd[tile_grid(BLOCK_M=M)](x, *noisy, w1, w2, b2, pos, outputs[0], tx,
                                           outputs[1] if tx is not None else None, M, n_cols, K,
                                           D, *image_geometry(x, p),
                                           ROW_BUCKET=row_bucket(M), NOISY=noisy_flag,
                                           TANGENT=tx is not None,
                                           PRECISION=dot_precision(w1.dtype), BLOCK_K=block(K))
    return outputs


@torch.library.custom_op("jitfast::patch_embed", mutates_args=())
def patch_embed_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   pos: torch.Tensor, noise: Optional[torch.Tensor], t: Optional[torch.Tensor],
                   noise_scale: float, in_matmul_dtype: bool) -> torch.Tensor:
    """The embedding of x, or with noise and t of z = t·x + (1 - t)·noise_scale·noise."""
    return _forward(x, w1, w2, b2, pos, noise, t, noise_scale,
                    in_matmul_dtype=in_matmul_dtype)[0]


@torch.library.custom_op("jitfast::patch_embed_dual", mutates_args=())
def patch_embed_dual_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        pos: torch.Tensor, tx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, tout): the embedding of x and its tangent along tx (an image like x), one pass;
    gradients through out only."""
    out, tout = _forward(x, w1, w2, b2, pos, None, None, 1.0, tx)
    return out, tout


@patch_embed_dual_op.register_fake
def _(x, w1, w2, b2, pos, tx):
    M, _, _, _ = _shapes(x, w1)
    shape = (x.shape[0], M // x.shape[0], w2.shape[0])
    return (x.new_empty(shape, dtype=_out_dtype(x, w2, b2, pos)),
            x.new_empty(shape, dtype=_out_dtype(x, w2, b2, pos)))


@patch_embed_op.register_fake
def _(x, w1, w2, b2, pos, noise, t, noise_scale, in_matmul_dtype):
    M, _, _, _ = _shapes(x, w1)
    return x.new_empty(x.shape[0], M // x.shape[0], w2.shape[0],
                       dtype=_out_dtype(x, w2, b2, pos, in_matmul_dtype))


def _image_grads(x, noise, needs_dx):
    """Empty grads of the image and of the noise (empty(0) where not needed or absent)."""
    return (torch.empty_like(x) if needs_dx else empty(x),
            torch.empty_like(noise) if needs_dx and noise is not None else empty(x))


@torch.library.custom_op("jitfast::patch_embed_backward", mutates_args=())
def patch_embed_backward(dout: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor],
                         t: Optional[torch.Tensor], noise_scale: float, w1: torch.Tensor,
                         w2: torch.Tensor, needs_dx: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (dx, dnoise, dw1, dw2); dx and dnoise are empty unless needs_dx, dnoise also
    without noise.

    The kernel writes the bottleneck h and its grad dh in float32 (tokens × K, small), and the
    patch vectors (tokens × C·p²) in w1's dtype. The weight grads take them in the weights'
    dtype (weight_grad), as the forward's second matmul took h and the dx path takes dh: under
    autocast dw2 is then the grad for the bf16 h the forward used, and both are bf16 GEMMs
    accumulating in float32, as in the reference's backward. dout (float32 when the bias or
    position table is) is cast likewise."""
    dout, x, noise, t, w1, w2 = (None if v is None else v.contiguous()
                                 for v in (dout, x, noise, t, w1, w2))
    M, n_cols, K, p = _shapes(x, w1)
    D = w2.shape[0]
    h = x.new_empty(M, K, dtype=torch.float32)
    dh = torch.empty_like(h)
    z = x.new_empty(M, n_cols, dtype=w1.dtype)
    dx, dnoise = _image_grads(x, noise, needs_dx)
    noisy, noisy_flag = _noisy_args(noise, t, noise_scale)
    _patch_embed_bwd[tile_grid(BLOCK_M=M)](x, *noisy, w1, w2, dout, h, dh, z, dx, dnoise, M,
                                           n_cols, K, D, *image_geometry(x, p),
                                           ROW_BUCKET=row_bucket(M), NOISY=noisy_flag,
                                           NEEDS_DX=needs_dx, PRECISION=dot_precision(w1.dtype),
                                           BLOCK_K=block(K))
    dw1 = weight_grad(dh.t(), z, w1.dtype)
    dw2 = weight_grad(dout.reshape(M, D).t(), h, w2.dtype)
    return dx, dnoise, dw1.reshape(w1.shape), dw2.reshape(w2.shape)


@patch_embed_backward.register_fake
def _(dout, x, noise, t, noise_scale, w1, w2, needs_dx):
    return (*_image_grads(x, noise, needs_dx), torch.empty_like(w1), torch.empty_like(w2))


def _setup_context(ctx, inputs, output):
    x, w1, w2, b2, pos, noise, t, noise_scale = inputs[:8]
    ctx.b2_dtype, ctx.pos_dtype, ctx.noise_scale = b2.dtype, pos.dtype, noise_scale
    ctx.save_for_backward(x, noise, t, w1, w2)


def _dual_setup_context(ctx, inputs, output):
    x, w1, w2, b2, pos, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the tangent gets no grad, not even a zero one
    _setup_context(ctx, (x, w1, w2, b2, pos, None, None, 1.0, False), output[0])


def _dual_backward_fn(ctx, dout, _):
    dx, dw1, dw2, db2, dpos, *_ = _backward_fn(ctx, dout)
    return dx, dw1, dw2, db2, dpos, None


def _backward_fn(ctx, dout):
    x, noise, t, w1, w2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_dx = needs[0] or needs[5]
    dx, dnoise, dw1, dw2 = patch_embed_backward(dout, x, noise, t, ctx.noise_scale, w1, w2,
                                                needs_dx)
    db2 = dout.sum((0, 1), dtype=torch.float32).to(ctx.b2_dtype)
    # pMF learns its position table; JiT's is fixed
    dpos = dout.sum(0, keepdim=True, dtype=torch.float32).to(ctx.pos_dtype) if needs[4] else None
    # t gets no grad: the objective's draw, not a parameter (as the head's velocity ops' t)
    return (dx if needs[0] else None, dw1, dw2, db2, dpos, dnoise if needs[5] else None, None,
            None, None)


patch_embed_op.register_autograd(_backward_fn, setup_context=_setup_context)
patch_embed_dual_op.register_autograd(_dual_backward_fn, setup_context=_dual_setup_context)


def patch_embed(x, w1, w2, b2, pos, noise=None, t=None, noise_scale=1.0,
                in_matmul_dtype=False):
    """``ops.patch_embed``; under autocast the matmul operands run in its dtype, and the bias and
    position table are added in theirs, as in the reference (the sum then written in the
    matmuls' dtype with in_matmul_dtype). With noise and t, the embedding of
    z = t·x + (1 - t)·noise_scale·noise (formed in float32, then cast like an image would be)."""
    if not use_kernel(x):
        return ref.patch_embed(x, w1, w2, b2, pos, noise, t, noise_scale, in_matmul_dtype)
    if noise is None:
        x, w1, w2 = autocast_operands(x, w1, w2)
    else:
        w1, w2 = autocast_operands(w1, w2)
    return patch_embed_op(x, w1, w2, b2, pos, noise, t, float(noise_scale), in_matmul_dtype)


def patch_embed_dual(x, w1, w2, b2, pos, tx):
    """``patch_embed`` and its tangent along the image tx; under autocast both in its dtype."""
    if not use_kernel(x):
        return ref.patch_embed_dual(x, w1, w2, b2, pos, tx)
    x, w1, w2, tx = autocast_operands(x, w1, w2, tx)
    return patch_embed_dual_op(x, w1, w2, b2, pos, tx)
