"""SwiGLU activation silu(a)·b on the halves (a, b) of the fused w12 output, in float32."""
import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import use_kernel

BLOCK = 1024


@triton.jit
def _swiglu_fwd(X12, OUT, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(X12 + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * F + cols, a * tl.sigmoid(a) * b, mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, X12, DX12, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(X12 + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(DX12 + row * 2 * F + cols, dout * b * sig * (1.0 + a * (1.0 - sig)), mask=mask)
    tl.store(DX12 + row * 2 * F + F + cols, dout * a * sig, mask=mask)


def _grid(x12):
    F = x12.shape[-1] // 2
    return (x12.numel() // (2 * F), triton.cdiv(F, BLOCK)), F


@torch.library.custom_op("jitfast::swiglu", mutates_args=())
def swiglu_op(x12: torch.Tensor) -> torch.Tensor:
    x12 = x12.contiguous()
    grid, F = _grid(x12)
    out = x12.new_empty(*x12.shape[:-1], F)
    _swiglu_fwd[grid](x12, out, F, BLOCK=BLOCK)
    return out


@swiglu_op.register_fake
def _(x12):
    return x12.new_empty(*x12.shape[:-1], x12.shape[-1] // 2)


@torch.library.custom_op("jitfast::swiglu_backward", mutates_args=())
def swiglu_backward(dout: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    dout, x12 = dout.contiguous(), x12.contiguous()
    grid, F = _grid(x12)
    dx12 = torch.empty_like(x12)
    _swiglu_bwd[grid](dout, x12, dx12, F, BLOCK=BLOCK)
    return dx12


@swiglu_backward.register_fake
def _(dout, x12):
    return torch.empty_like(x12)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_fn(ctx, dout):
    return swiglu_backward(dout, ctx.saved_tensors[0])


swiglu_op.register_autograd(_backward_fn, setup_context=_setup_context)


def swiglu(x12):
    if not use_kernel(x12):
        return ref.swiglu(x12)
    return swiglu_op(x12)
