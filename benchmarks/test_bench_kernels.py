"""Each fused op, forward and forward+backward: the PyTorch reference eager (the baseline), the
same reference under torch.compile, and the Triton kernel (CUDA only), at the shapes the op has
inside JiT-B/L/H-16 at 256 px on CUDA, or inside a small preset on the CPU.

Beside time and FLOPs, each records the bytes the op must move (docs/design.md §4: its inputs read
once, its outputs written once; the backward reads the output grads and what it recomputes from,
and writes the input grads; per-sample vectors count once per sample, partial sums not at all),
the GB/s that makes, and on a GPU of known peak the fraction of its HBM bandwidth."""
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, DTYPE, ON_CUDA, skip_unless_cuda
from jitfast.functional import ops
from jitfast.network.alignment import padded_width
from jitfast.network.presets import preset_config

# (preset, image size, batch)
SIZES = [("JiT-B/16", 256, 128), ("JiT-L/16", 256, 128), ("JiT-H/16", 256, 64)] if ON_CUDA \
    else [("JiT-T/8", 64, 16)]
VARIANTS = ("eager", "compile", "triton")  # the first is the baseline
PASSES = ("forward", "forward+backward")
F32 = 4  # bytes of a float32 element: parameters, image, position and RoPE tables, rstd


Input = namedtuple("Input", "shape dtype trainable")


def act(*shape):
    """An activation: DTYPE, and differentiated when timing the backward."""
    return Input(shape, DTYPE, True)


def param(*shape):
    """A float32 parameter (autocast casts it where the reference would)."""
    return Input(shape, torch.float32, True)


def const(*shape):
    """A float32 input that needs no gradient (image, position table, RoPE tables)."""
    return Input(shape, torch.float32, False)


def dims(preset, image, batch):
    c = preset_config(preset)
    D, heads, p = c["hidden_size"], c["num_heads"], c["patch_size"]
    patches = (image // p) ** 2
    tokens = patches + c["in_context_len"]
    hidden = int(int(4 * D) * 2 / 3)  # SwiGLU's; the MLP's matmuls run it padded (width)
    return SimpleNamespace(B=batch, S=image, D=D, heads=heads, hd=D // heads, p=p,
                           patches=patches, tokens=tokens, rows=batch * tokens,
                           bottleneck=c["bottleneck_dim"], hidden=hidden,
                           width=padded_width(hidden))


def patch_embed_traffic(d, a):
    image, table = d.B * 3 * d.S ** 2 * F32, d.patches * d.D * F32
    weights = (d.bottleneck * 3 * d.p ** 2 + d.D * d.bottleneck + d.D) * F32
    out = d.B * d.patches * d.D * a
    # the backward reads dout, the image and the weights (to recompute the bottleneck) and
    # writes the weight grads
    return image + weights + table + out, out + image + 2 * weights


def norm_traffic(d, a, gated):
    """rms_norm_modulate, or (gated) gated_residual_rms_norm_modulate: per row the forward reads
    x (and h) and writes u (and x_new) and rstd; the backward reads du (and dx_new), the
    normalised x, rstd (and h) and writes dx (and dh); the weight and the per-sample shift,
    scale (and gate) once each, and their grads."""
    x, vec, weight, rstd = d.rows * d.D * a, d.B * d.D * a, d.D * F32, d.rows * F32
    if gated:
        return 4 * x + 3 * vec + weight + rstd, 6 * x + rstd + 5 * vec + 2 * weight
    return 2 * x + 2 * vec + weight + rstd, 3 * x + rstd + 3 * vec + 2 * weight


def qk_norm_rope_traffic(d, a):
    """Forward: the q and k parts of qkv read, q and k written (v is a view of qkv). Backward:
    dq, dk, dv and the q and k parts of qkv read, dqkv written. Plus the cos/sin tables and the
    two norm weights (and their grads)."""
    small = 2 * d.tokens * d.hd * F32 + 2 * d.hd * F32
    return d.rows * 4 * d.D * a + small, d.rows * 8 * d.D * a + small + 2 * d.hd * F32


def output_head_traffic(d, a):
    u, image = d.B * d.patches * d.D * a, d.B * 3 * d.S ** 2 * a
    weights = (3 * d.p ** 2 * d.D + 3 * d.p ** 2) * F32
    return u + weights + image, image + 2 * (u + weights)  # reads dout, u, W; writes du, dW, db


def swiglu_mlp_traffic(d, a):
    """The activations each of the MLP's matmuls reads and writes once (the fused path's): the
    forward reads x, writes x12 and the hidden, reads it and writes y; the backward reads dy and
    x12 and writes dx12 (dy·w3 with SwiGLU's backward), reads dy and the hidden (w3's grad),
    dx12 and x (w12's), dx12 and writes dx."""
    x, hidden = d.rows * d.D * a, d.rows * d.width * a
    return 2 * x + 4 * hidden, 4 * x + 9 * hidden


Op = namedtuple("Op", "inputs macs traffic")
# op name -> its inputs at dims d, its matmul multiply-adds per image, and the bytes its forward
# and its backward must move at dims d with activations of a bytes
OPS = {
    "patch_embed": Op(
        lambda d: (const(d.B, 3, d.S, d.S), param(d.bottleneck, 3, d.p, d.p),
                   param(d.D, d.bottleneck, 1, 1), param(d.D), const(1, d.patches, d.D)),
        lambda d: d.patches * (3 * d.p ** 2 * d.bottleneck + d.bottleneck * d.D),
        patch_embed_traffic),
    "rms_norm_modulate": Op(
        lambda d: (act(d.B, d.tokens, d.D), param(d.D), act(d.B, d.D), act(d.B, d.D)),
        lambda d: 0,
        lambda d, a: norm_traffic(d, a, gated=False)),
    "gated_residual_rms_norm_modulate": Op(
        lambda d: (act(d.B, d.tokens, d.D), act(d.B, d.tokens, d.D), act(d.B, d.D), param(d.D),
                   act(d.B, d.D), act(d.B, d.D)),
        lambda d: 0,
        lambda d, a: norm_traffic(d, a, gated=True)),
    "qk_norm_rope": Op(
        lambda d: (act(d.B, d.tokens, 3 * d.D), d.heads, param(d.hd), param(d.hd),
                   const(d.tokens, d.hd), const(d.tokens, d.hd)),
        lambda d: 0,
        qk_norm_rope_traffic),
    "swiglu": Op(lambda d: (act(d.B, d.tokens, 2 * d.hidden),), lambda d: 0,
                 # x12 read, half as much written; the backward reads dout and x12, writes dx12
                 lambda d, a: (3 * d.rows * d.hidden * a, 5 * d.rows * d.hidden * a)),
    "swiglu_mlp": Op(
        lambda d: (act(d.B, d.tokens, d.D), param(2 * d.width, d.D), param(2 * d.width),
                   param(d.D, d.width)),
        lambda d: d.tokens * 3 * d.D * d.width,
        swiglu_mlp_traffic),
    "output_head": Op(
        lambda d: (act(d.B, d.patches, d.D), param(3 * d.p ** 2, d.D), param(3 * d.p ** 2), d.p,
                   3),
        lambda d: d.patches * d.D * 3 * d.p ** 2,
        output_head_traffic),
}


def materialize(specs, backward):
    """The op's arguments, and those to differentiate when timing the backward."""
    args = [torch.randn(s.shape, dtype=s.dtype, device=DEVICE, requires_grad=backward
                        and s.trainable) if isinstance(s, Input) else s for s in specs]
    return args, [a for a in args if torch.is_tensor(a) and a.requires_grad]


def implementation(name, variant):
    if variant == "triton":
        skip_unless_cuda(variant)
        from jitfast import kernels
        return getattr(kernels, name)
    fn = getattr(ops, name)
    return torch.compile(fn, dynamic=False) if variant == "compile" else fn


def timed_call(fn, args, leaves):
    """fn(*args) under the model's autocast, then (when leaves) the gradients of its outputs."""
    def forward():
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=ON_CUDA):
            out = fn(*args)
        return out if isinstance(out, tuple) else (out,)
    if not leaves:
        return forward
    grads = [torch.randn_like(out) for out in forward()]
    return lambda: torch.autograd.grad(forward(), leaves, grads)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", SIZES, ids=[s[0] for s in SIZES])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("name", list(OPS))
def test_kernel(measure, name, pass_, size, variant):
    fn = implementation(name, variant)
    d = dims(*size)
    op = OPS[name]
    backward = pass_ == "forward+backward"
    args, leaves = materialize(op.inputs(d), backward)
    preset, image, batch = size
    forward_bytes, backward_bytes = op.traffic(d, DTYPE.itemsize)
    moved = forward_bytes + (backward_bytes if backward else 0)
    measure(timed_call(fn, args, leaves), f"{name} {pass_} {preset}", "kernel", variant,
            baseline=variant == VARIANTS[0], images=batch,
            flops=2 * op.macs(d) * batch * (3 if backward else 1), preset=preset,
            shape=f"{batch}x{image}px", op=name, pass_=pass_, traffic=moved)


@pytest.mark.parametrize("matmuls", ["cublas", "fused"])
@pytest.mark.parametrize("size", SIZES, ids=[s[0] for s in SIZES])
def test_swiglu_mlp_matmuls(measure, monkeypatch, size, matmuls):
    """The SwiGLU MLP forward+backward on the Triton kernels: cuBLAS's matmuls around the SwiGLU
    kernel (JITFAST_FUSED_MLP=0, the baseline) against SwiGLU in the epilogues of Triton matmuls
    (kernels/swiglu_matmul.py): whether Triton's matmuls keep up with cuBLAS's well enough for
    the traffic they save (benchmarks/NOTES.md gives the break-even rates)."""
    skip_unless_cuda("triton")
    from jitfast.kernels import swiglu_matmul
    monkeypatch.setattr(swiglu_matmul, "FUSED", matmuls == "fused")
    d = dims(*size)
    op = OPS["swiglu_mlp"]
    args, leaves = materialize(op.inputs(d), True)
    preset, image, batch = size
    measure(timed_call(swiglu_matmul.swiglu_mlp, args, leaves),
            f"swiglu_mlp forward+backward {preset}, the matmuls", "kernel", matmuls,
            baseline=matmuls == "cublas", images=batch, flops=6 * op.macs(d) * batch,
            preset=preset, shape=f"{batch}x{image}px", op="swiglu_mlp",
            pass_="forward+backward", traffic=sum(op.traffic(d, DTYPE.itemsize)))
