"""Bottleneck patch embedding in one kernel: patches gathered straight from the NCHW image, both
matmuls (C·p² → bottleneck → D), bias and position table; the bottleneck activation stays in
registers.

The backward kernel recomputes the bottleneck h, forms dh = dout·W2 and scatters dx = dh·W1 back
to NCHW; it writes h and dh (M × bottleneck, small) so the weight grads, reductions over all
tokens, are plain matmuls left to cuBLAS.
"""
import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autocast_operands, autotune, block, dot_precision, gather_matmul,
                      image_geometry, patch_offsets, row_bucket, tile_grid, use_kernel, weight_grad)

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_J": 64, "BLOCK_D": 64}, num_warps=w)
           for m, w in ((32, 4), (64, 4), (64, 8))]


@autotune(CONFIGS, key=["n_cols", "K", "D"])
@triton.jit
def _patch_embed_fwd(X, W1, W2, B2, POS, OUT, M, n_cols, K, D,
                     n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                     PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    kk = tl.arange(0, BLOCK_K)
    h = gather_matmul(X, W1, tok, M, kk[None, :], K, n_cols, 1, n_cols,
                      n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, False,
                      BLOCK_M, BLOCK_J, BLOCK_K, PRECISION)
    h = h.to(W2.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)[None, :]
        w2 = tl.load(W2 + dd * K + kk[:, None], mask=(kk[:, None] < K) & (dd < D), other=0.0)
        out = tl.dot(h, w2, input_precision=PRECISION)
        out += tl.load(B2 + dd, mask=dd < D, other=0.0).to(tl.float32)
        mask = (tok < M) & (dd < D)
        out += tl.load(POS + (tok % n_tok) * D + dd, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + tok.to(tl.int64) * D + dd, out, mask=mask)


@autotune(CONFIGS, key=["n_cols", "K", "D"])
@triton.jit
def _patch_embed_bwd(X, W1, W2, DOUT, H, DH, DX, M, n_cols, K, D,
                     n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                     NEEDS_DX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    kk = tl.arange(0, BLOCK_K)[None, :]
    k_col = tl.arange(0, BLOCK_K)[:, None]
    mask_h = (tok < M) & (kk < K)
    h = gather_matmul(X, W1, tok, M, kk, K, n_cols, 1, n_cols,
                      n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, False,
                      BLOCK_M, BLOCK_J, BLOCK_K, PRECISION)
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
        for j0 in range(0, n_cols, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)[None, :]
            w1 = tl.load(W1 + k_col * n_cols + j, mask=(k_col < K) & (j < n_cols), other=0.0)
            dx = tl.dot(dh, w1, input_precision=PRECISION)
            offs = patch_offsets(tok, j, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, False)
            tl.store(DX + offs, dx, mask=(tok < M) & (j < n_cols))


def _out_dtype(x, b2, pos):
    """The reference's: the matmuls run in x's dtype, then bias and table are added."""
    return torch.promote_types(torch.promote_types(x.dtype, b2.dtype), pos.dtype)


def _shapes(x, w1):
    K = w1.shape[0]
    p = w1.shape[-1]
    return x.shape[0] * (x.shape[2] // p) * (x.shape[3] // p), w1[0].numel(), K, p


@torch.library.custom_op("jitfast::patch_embed", mutates_args=())
def patch_embed_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
    x, w1, w2, b2, pos = (t.contiguous() for t in (x, w1, w2, b2, pos))
    M, n_cols, K, p = _shapes(x, w1)
    D = w2.shape[0]
    out = x.new_empty(x.shape[0], M // x.shape[0], D, dtype=_out_dtype(x, b2, pos))
    _patch_embed_fwd[tile_grid(BLOCK_M=M)](x, w1, w2, b2, pos, out, M, n_cols, K, D,
                                   *image_geometry(x, p), ROW_BUCKET=row_bucket(M),
                                   PRECISION=dot_precision(w1.dtype), BLOCK_K=block(K))
    return out


@patch_embed_op.register_fake
def _(x, w1, w2, b2, pos):
    M, _, _, _ = _shapes(x, w1)
    return x.new_empty(x.shape[0], M // x.shape[0], w2.shape[0], dtype=_out_dtype(x, b2, pos))


@torch.library.custom_op("jitfast::patch_embed_backward", mutates_args=())
def patch_embed_backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                         w2: torch.Tensor, needs_dx: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (dx, dw1, dw2); dx is empty unless needs_dx.

    The kernel writes the bottleneck h and its grad dh in float32 (tokens × K, small). The
    weight grads take them in the weights' dtype (weight_grad), as the forward's second matmul
    took h and the dx path takes dh: under autocast dw2 is then the grad for the bf16 h the
    forward used, and both are bf16 GEMMs accumulating in float32, as in the reference's
    backward. dout (float32 when the bias or position table is) is cast likewise."""
    dout, x, w1, w2 = (t.contiguous() for t in (dout, x, w1, w2))
    M, n_cols, K, p = _shapes(x, w1)
    D = w2.shape[0]
    h = x.new_empty(M, K, dtype=torch.float32)
    dh = torch.empty_like(h)
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    _patch_embed_bwd[tile_grid(BLOCK_M=M)](x, w1, w2, dout, h, dh, dx, M, n_cols, K, D,
                                    *image_geometry(x, p), ROW_BUCKET=row_bucket(M),
                                    NEEDS_DX=needs_dx, PRECISION=dot_precision(w1.dtype),
                                    BLOCK_K=block(K))
    dw1 = weight_grad(dh.t(), ref.patchify(x, p).reshape(M, n_cols), w1.dtype)
    dw2 = weight_grad(dout.reshape(M, D).t(), h, w2.dtype)
    return dx, dw1.reshape(w1.shape), dw2.reshape(w2.shape)


@patch_embed_backward.register_fake
def _(dout, x, w1, w2, needs_dx):
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return dx, torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    ctx.b2_dtype = inputs[3].dtype
    ctx.save_for_backward(*inputs[:3])


def _backward_fn(ctx, dout):
    needs_dx = ctx.needs_input_grad[0]
    dx, dw1, dw2 = patch_embed_backward(dout, *ctx.saved_tensors, needs_dx)
    db2 = dout.sum((0, 1), dtype=torch.float32).to(ctx.b2_dtype)
    return dx if needs_dx else None, dw1, dw2, db2, None


patch_embed_op.register_autograd(_backward_fn, setup_context=_setup_context)


def patch_embed(x, w1, w2, b2, pos):
    """``ops.patch_embed``; under autocast the matmul operands run in its dtype, and the bias and
    position table are added in theirs, as in the reference."""
    if not use_kernel(x):
        return ref.patch_embed(x, w1, w2, b2, pos)
    return patch_embed_op(*autocast_operands(x, w1, w2), b2, pos)
