"""The SwiGLU MLP y = w3(silu(a)·b), (a, b) = w12(x), with SwiGLU in the epilogues of two Triton
matmuls: the forward's x·w12ᵀ (+ bias) writes x12 (the backward's input) and the hidden
silu(a)·b in one pass, so no kernel reads x12 back; the backward's dy·w3 turns its tile of the
hidden's grad into the grad of x12 (and the bias's partial sums) before it is ever written. The
rest (y = hidden·w3ᵀ, the weight grads, dx) is cuBLAS's. Against cuBLAS plus the SwiGLU kernels
this saves the forward's read of x12 and the backward's write and read of the hidden's grad.

``JITFAST_FUSED_MLP=0`` (read once, at import) runs cuBLAS's matmuls around ``swiglu`` instead:
the trace prices these matmuls at cuBLAS's rate, and whether Triton's keep up with it at these
shapes (the forward must reach 73% of it to gain, the backward 45%: benchmarks/NOTES.md) is for
a GPU to measure, beside this baseline.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autocast_operands, autotune, dot_precision, empty, row_bucket, use_kernel,
                      weight_grad)
from .swiglu import swiglu, swiglu_grads, swiglu_halves

FUSED = os.environ.get("JITFAST_FUSED_MLP", "1") != "0"


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for m, n, k, s, w in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): tiles for Hopper's wgmma (the forward's BLOCK_N per
# half: two accumulators) that compile for sm_90 without spilling registers (the backward's
# 128 × 128 spills 184 bytes), their shared memory 96-192 KB
FWD_CONFIGS = _configs([(128, 128, 64, 3, 8), (128, 64, 64, 4, 8), (64, 128, 64, 4, 8),
                        (128, 128, 64, 4, 8)])
# the backward's BLOCK_M is fixed: the bias grad's partial sums are one row per row tile
BWD_BLOCK_M = 128
BWD_CONFIGS = _configs([(BWD_BLOCK_M, 64, 64, 4, 8), (BWD_BLOCK_M, 128, 64, 4, 8),
                        (BWD_BLOCK_M, 32, 64, 4, 4), (BWD_BLOCK_M, 128, 64, 3, 8)])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, rows, cols) of this program's output tile: programs walk GROUP_M row tiles
    down a column of tiles before the next column, so the weight tiles they read stay in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group) % size_m
    tile_n = (pid % group) // size_m
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    return tile_m, rows, (tile_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]


@autotune(FWD_CONFIGS, key=["F", "K", "HAS_BIAS"])
@triton.jit
def _swiglu_matmul_fwd(X, W, BIAS, X12, OUT, M, F, K, ROW_BUCKET, HAS_BIAS: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """x12 = x·Wᵀ + bias (M × 2F) and silu(a)·b of its halves (M × F), the product computed as
    x12 is stored: a tile of columns cols of a and the same of b, two accumulators."""
    _, rows, cols = _grouped_tile(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)
    w_rows = cols.to(tl.int64) * K  # w12's rows of a's columns (b's are F rows on)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(X + rows * K + (k + ks)[None, :],
                    mask=(rows < M) & ((k + ks)[None, :] < K), other=0.0)
        w_mask = ((k + ks)[:, None] < K) & (cols < F)
        w_a = tl.load(W + w_rows + (k + ks)[:, None], mask=w_mask, other=0.0)
        w_b = tl.load(W + F * K + w_rows + (k + ks)[:, None], mask=w_mask, other=0.0)
        acc_a = tl.dot(x, w_a, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(x, w_b, acc_b, input_precision=PRECISION)
    if HAS_BIAS:
        acc_a += tl.load(BIAS + cols, mask=cols < F, other=0.0).to(tl.float32)
        acc_b += tl.load(BIAS + F + cols, mask=cols < F, other=0.0).to(tl.float32)
    # the product of the halves as stored, as a SwiGLU reading x12 would form it
    a = acc_a.to(X12.dtype.element_ty)
    b = acc_b.to(X12.dtype.element_ty)
    mask = (rows < M) & (cols < F)
    tl.store(X12 + rows * 2 * F + cols, a, mask=mask)
    tl.store(X12 + rows * 2 * F + F + cols, b, mask=mask)
    a = a.to(tl.float32)
    tl.store(OUT + rows * F + cols, a * tl.sigmoid(a) * b.to(tl.float32), mask=mask)


@autotune(BWD_CONFIGS, key=["F", "K", "HAS_BIAS"])
@triton.jit
def _swiglu_matmul_bwd(DY, W3, X12, DX12, DB_PART, M, F, K, ROW_BUCKET,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The grad of x12 (M × 2F) from the tile dy·W3 (M × K by K × F) of the hidden's grad, which
    is never stored; with HAS_BIAS each row tile's sums of it to DB_PART[row tile] (2F)."""
    tile_m, rows, cols = _grouped_tile(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)
    dout = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        dy = tl.load(DY + rows * K + (k + ks)[None, :],
                     mask=(rows < M) & ((k + ks)[None, :] < K), other=0.0)
        w = tl.load(W3 + (k + ks)[:, None].to(tl.int64) * F + cols,
                    mask=((k + ks)[:, None] < K) & (cols < F), other=0.0)
        dout = tl.dot(dy, w, dout, input_precision=PRECISION)
    mask = (rows < M) & (cols < F)
    a, b = swiglu_halves(X12, X12, rows, cols, mask, F, False)
    da, db = swiglu_grads(dout, a, b)
    tl.store(DX12 + rows * 2 * F + cols, da, mask=mask)
    tl.store(DX12 + rows * 2 * F + F + cols, db, mask=mask)
    if HAS_BIAS:  # rows past M have dy = 0, so da = db = 0 there
        part = DB_PART + tile_m.to(tl.int64) * 2 * F + tl.reshape(cols, [BLOCK_N])
        lanes = tl.reshape(cols < F, [BLOCK_N])
        tl.store(part, tl.sum(da, axis=0), mask=lanes)
        tl.store(part + F, tl.sum(db, axis=0), mask=lanes)


def _matrix(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


def _launch_grid(M, width):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)


@torch.library.custom_op("jitfast::swiglu_matmul", mutates_args=())
def swiglu_matmul_op(x: torch.Tensor, w12: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x12, hidden) for x (M × K), w12 (2F × K): x12 = x·w12ᵀ + bias, hidden = silu(a)·b."""
    x, w12 = x.contiguous(), w12.contiguous()
    M, K = x.shape
    width = w12.shape[0] // 2
    x12, hidden = x.new_empty(M, 2 * width), x.new_empty(M, width)
    _swiglu_matmul_fwd[_launch_grid(M, width)](
        x, w12, bias, x12, hidden, M, width, K, ROW_BUCKET=row_bucket(M),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return x12, hidden


@swiglu_matmul_op.register_fake
def _(x, w12, bias):
    width = w12.shape[0] // 2
    return x.new_empty(x.shape[0], 2 * width), x.new_empty(x.shape[0], width)


@torch.library.custom_op("jitfast::swiglu_matmul_backward", mutates_args=())
def swiglu_matmul_backward(dy: torch.Tensor, w3: torch.Tensor, x12: torch.Tensor,
                           has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx12, dbias) for dy (M × K), w3 (K × F) and the forward's x12 (M × 2F); dbias (2F,
    float32) empty without a bias."""
    dy, w3 = dy.contiguous(), w3.contiguous()
    M, K = dy.shape
    width = w3.shape[1]
    dx12 = torch.empty_like(x12)
    part = (x12.new_empty(triton.cdiv(M, BWD_BLOCK_M), 2 * width, dtype=torch.float32)
            if has_bias else empty(x12))
    _swiglu_matmul_bwd[_launch_grid(M, width)](
        dy, w3, x12, dx12, part, M, width, K, ROW_BUCKET=row_bucket(M), HAS_BIAS=has_bias,
        PRECISION=dot_precision(dy.dtype))
    return dx12, part.sum(0) if has_bias else part


@swiglu_matmul_backward.register_fake
def _(dy, w3, x12, has_bias):
    return (torch.empty_like(x12),
            x12.new_empty(x12.shape[1] if has_bias else 0, dtype=torch.float32))


class SwiGLUMLP(torch.autograd.Function):
    """The MLP on the two fused matmuls, cuBLAS for the rest; saves what autograd would save
    for the unfused composition: x, x12 and the hidden."""

    @staticmethod
    def forward(ctx, x, w12, bias, w3):
        x12, hidden = swiglu_matmul_op(_matrix(x), w12, bias)
        ctx.save_for_backward(x, w12, w3, x12, hidden)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(hidden, w3).view(*x.shape[:-1], w3.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w12, w3, x12, hidden = ctx.saved_tensors
        dy = _matrix(dy)
        dx12, dbias = swiglu_matmul_backward(dy, w3, x12, ctx.bias_dtype is not None)
        dx = (dx12 @ w12).view(x.shape)
        return (dx, weight_grad(dx12.t(), _matrix(x), w12.dtype),
                None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype),
                weight_grad(dy.t(), hidden, w3.dtype))


def swiglu_mlp(x, w12, bias, w3):
    """x·w12ᵀ (+ bias) → silu(a)·b → ·w3ᵀ (w3's bias is the caller's); under autocast the
    matmuls run in its dtype, like F.linear's. cuBLAS's and ``swiglu`` with JITFAST_FUSED_MLP=0."""
    D, width = x.shape[-1], w3.shape[-1]
    if w12.shape != (2 * width, D) or (bias is not None and bias.shape != (2 * width,)):
        raise ValueError(f"swiglu_mlp: x (..., {D}) and w3 (D', {width}) need w12 of shape "
                         f"({2 * width}, {D}) and a bias of ({2 * width},) or None; got w12 "
                         f"{tuple(w12.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    if not use_kernel(x):
        return ref.swiglu_mlp(x, w12, bias, w3)
    if not FUSED:
        return F.linear(swiglu(F.linear(x, w12), bias=bias), w3)
    x, w12, w3 = autocast_operands(x, w12, w3)
    return SwiGLUMLP.apply(x, w12, bias, w3)
