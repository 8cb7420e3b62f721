"""SwiGLU activation silu(a)·b on the halves (a, b) of the fused w12 output, plus that Linear's
bias when given (the Linear then runs without it), in float32.

The forward runs one program per (row, block of columns). The backward works on 2-D tiles of
BLOCK_R rows by BLOCK_F columns: program (columns, chunk) takes a contiguous run of the row tiles
(program_tiles) and sums the grad of x12 over its rows into one partial row of the bias grad,
summed afterwards, so the bias grad costs no pass over the (tokens × 2F) grad of its own.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import autotune, empty, reduction_programs, row_bucket, use_kernel

BLOCK = 1024
# (BLOCK_R, BLOCK_F, num_warps): 8 to 32 elements of each of the five tiles per thread
BWD_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_F": f}, num_warps=w)
               for r, f, w in ((4, 512, 4), (8, 512, 8), (16, 256, 8), (8, 256, 4))]


@triton.jit
def swiglu_halves(X12, B12, rows, cols, mask, F, HAS_BIAS: tl.constexpr):
    """(a, b): the two halves of x12 at rows × cols, plus the bias, in float32."""
    a = tl.load(X12 + rows * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + rows * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(B12 + cols, mask=cols < F, other=0.0).to(tl.float32)
        b += tl.load(B12 + F + cols, mask=cols < F, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _swiglu_fwd(X12, B12, OUT, T12, TOUT, F, HAS_BIAS: tl.constexpr, TANGENT: tl.constexpr,
                BLOCK: tl.constexpr):
    """One row's block of columns; with TANGENT also the tangent along T12 (laid out as x12):
    silu'(a)·ȧ·b + silu(a)·ḃ."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a, b = swiglu_halves(X12, B12, row, cols, mask, F, HAS_BIAS)
    sig = tl.sigmoid(a)
    tl.store(OUT + row * F + cols, a * sig * b, mask=mask)
    if TANGENT:
        ta, tb = swiglu_halves(T12, T12, row, cols, mask, F, False)
        tout = sig * (1.0 + a * (1.0 - sig)) * ta * b + a * sig * tb
        tl.store(TOUT + row * F + cols, tout, mask=mask)


@triton.jit
def swiglu_grads(dout, a, b):
    """(da, db): the grads of silu(a)·b given its grad dout, in float32."""
    sig = tl.sigmoid(a)
    return dout * b * sig * (1.0 + a * (1.0 - sig)), dout * a * sig


@autotune(BWD_CONFIGS, key=["F", "HAS_BIAS"])
@triton.jit
def _swiglu_bwd(DOUT, X12, B12, DX12, DB_PART, n_rows, F, ROW_BUCKET, HAS_BIAS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program (columns, chunk) handles a run of row tiles and writes its partial sums of the
    bias grad to DB_PART[chunk]."""
    cols = (tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]
    first, last = _chunk_tiles(n_rows, BLOCK_R)
    db_a = tl.zeros([BLOCK_F], dtype=tl.float32)
    db_b = tl.zeros([BLOCK_F], dtype=tl.float32)
    for tile in tl.range(first, last, num_stages=2):  # loads the next tile during this one
        rows = (tile * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]).to(tl.int64)
        mask = (rows < n_rows) & (cols < F)
        a, b = swiglu_halves(X12, B12, rows, cols, mask, F, HAS_BIAS)
        dout = tl.load(DOUT + rows * F + cols, mask=mask, other=0.0).to(tl.float32)
        da, db = swiglu_grads(dout, a, b)
        tl.store(DX12 + rows * 2 * F + cols, da, mask=mask)
        tl.store(DX12 + rows * 2 * F + F + cols, db, mask=mask)
        if HAS_BIAS:
            db_a += tl.sum(da, axis=0)
            db_b += tl.sum(db, axis=0)
    if HAS_BIAS:
        part = DB_PART + tl.program_id(1).to(tl.int64) * 2 * F + tl.reshape(cols, [BLOCK_F])
        lanes = tl.reshape(cols < F, [BLOCK_F])
        tl.store(part, db_a, mask=lanes)
        tl.store(part + F, db_b, mask=lanes)


@triton.jit
def _chunk_tiles(n, BLOCK: tl.constexpr):
    """program_tiles over grid axis 1 (the chunks of rows), axis 0 being the column blocks."""
    tiles = tl.cdiv(n, BLOCK)
    chunk = tl.program_id(1).to(tl.int64)
    chunks = tl.num_programs(1)
    return chunk * tiles // chunks, (chunk + 1) * tiles // chunks


def _rows_and_width(x12):
    F = x12.shape[-1] // 2
    return x12.numel() // (2 * F), F


def _forward(x12, bias, t12=None):
    """(out,), and with the tangent t12 of x12 (out, tout)."""
    x12 = x12.contiguous()
    rows, F = _rows_and_width(x12)
    outputs = [x12.new_empty(*x12.shape[:-1], F) for _ in range(1 if t12 is None else 2)]
    if t12 is not None:
        t12 = t12.contiguous()
    _swiglu_fwd[(rows, triton.cdiv(F, BLOCK))](x12, bias, outputs[0], t12,
                                               outputs[1] if t12 is not None else None, F,
                                               HAS_BIAS=bias is not None,
                                               TANGENT=t12 is not None, BLOCK=BLOCK)
    return outputs


@torch.library.custom_op("jitfast::swiglu", mutates_args=())
def swiglu_op(x12: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(x12, bias)[0]


@swiglu_op.register_fake
def _(x12, bias):
    return x12.new_empty(*x12.shape[:-1], x12.shape[-1] // 2)


@torch.library.custom_op("jitfast::swiglu_dual", mutates_args=())
def swiglu_dual_op(x12: torch.Tensor, bias: Optional[torch.Tensor], t12: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, tout): swiglu and its tangent along t12, one pass; gradients through out only."""
    out, tout = _forward(x12, bias, t12)
    return out, tout


@swiglu_dual_op.register_fake
def _(x12, bias, t12):
    shape = (*x12.shape[:-1], x12.shape[-1] // 2)
    return x12.new_empty(shape), x12.new_empty(shape)


@torch.library.custom_op("jitfast::swiglu_backward", mutates_args=())
def swiglu_backward(dout: torch.Tensor, x12: torch.Tensor, bias: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grads (dx12, dbias); dbias empty without a bias."""
    dout, x12 = dout.contiguous(), x12.contiguous()
    rows, F = _rows_and_width(x12)
    dx12 = torch.empty_like(x12)
    chunks = reduction_programs(triton.cdiv(F, BWD_CONFIGS[0].kwargs["BLOCK_F"]), rows,
                                x12.device)
    part = x12.new_empty(chunks, 2 * F, dtype=torch.float32) if bias is not None else empty(x12)
    _swiglu_bwd[lambda meta: (triton.cdiv(F, meta["BLOCK_F"]), chunks)](
        dout, x12, bias, dx12, part, rows, F, ROW_BUCKET=row_bucket(rows),
        HAS_BIAS=bias is not None)
    return dx12, part.sum(0).to(bias.dtype) if bias is not None else empty(x12)


@swiglu_backward.register_fake
def _(dout, x12, bias):
    return torch.empty_like(x12), empty(x12) if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    if isinstance(output, tuple):  # the dual op: its tangent gets no grad, not even a zero one
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:2])


def _backward_fn(ctx, dout):
    x12, bias = ctx.saved_tensors
    dx12, dbias = swiglu_backward(dout, x12, bias)
    return dx12, None if bias is None else dbias


swiglu_op.register_autograd(_backward_fn, setup_context=_setup_context)
swiglu_dual_op.register_autograd(lambda ctx, dout, _: (*_backward_fn(ctx, dout), None),
                                 setup_context=_setup_context)


def swiglu(x12, bias=None):
    if not use_kernel(x12):
        return ref.swiglu(x12, bias)
    return swiglu_op(x12, bias)


def swiglu_dual(x12, t12, bias=None):
    if not use_kernel(x12):
        return ref.swiglu_dual(x12, t12, bias)
    return swiglu_dual_op(x12, bias, t12)
