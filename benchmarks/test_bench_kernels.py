"""Each fused op, forward and forward+backward: the PyTorch reference eager (the baseline), the
same reference under torch.compile, and the Triton kernel (CUDA only), at the shapes the op has
inside JiT-B/L/H-16 at 256 px on CUDA, or inside a small preset on the CPU."""
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, DTYPE, ON_CUDA, needs_cuda
from jitfast import ops
from jitfast.presets import preset_config

# (preset, image size, batch)
SIZES = [("JiT-B/16", 256, 128), ("JiT-L/16", 256, 128), ("JiT-H/16", 256, 64)] if ON_CUDA \
    else [("JiT-T/8", 64, 16)]
VARIANTS = ("eager", "compile", "triton")  # the first is the baseline
PASSES = ("forward", "forward+backward")


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
    return SimpleNamespace(B=batch, S=image, D=D, heads=heads, hd=D // heads, p=p,
                           patches=patches, tokens=patches + c["in_context_len"],
                           bottleneck=c["bottleneck_dim"], hidden=int(int(4 * D) * 2 / 3))


# op name -> (its inputs at dims d, its matmul multiply-adds per image)
OPS = {
    "patch_embed": (
        lambda d: (const(d.B, 3, d.S, d.S), param(d.bottleneck, 3, d.p, d.p),
                   param(d.D, d.bottleneck, 1, 1), param(d.D), const(1, d.patches, d.D)),
        lambda d: d.patches * (3 * d.p ** 2 * d.bottleneck + d.bottleneck * d.D)),
    "rms_norm_modulate": (
        lambda d: (act(d.B, d.tokens, d.D), param(d.D), act(d.B, d.D), act(d.B, d.D)),
        lambda d: 0),
    "gated_residual_rms_norm_modulate": (
        lambda d: (act(d.B, d.tokens, d.D), act(d.B, d.tokens, d.D), act(d.B, d.D), param(d.D),
                   act(d.B, d.D), act(d.B, d.D)),
        lambda d: 0),
    "qk_norm_rope": (
        lambda d: (act(d.B, d.tokens, 3 * d.D), d.heads, param(d.hd), param(d.hd),
                   const(d.tokens, d.hd), const(d.tokens, d.hd)),
        lambda d: 0),
    "swiglu": (lambda d: (act(d.B, d.tokens, 2 * d.hidden),), lambda d: 0),
    "output_head": (
        lambda d: (act(d.B, d.patches, d.D), param(3 * d.p ** 2, d.D), param(3 * d.p ** 2), d.p,
                   3),
        lambda d: d.patches * d.D * 3 * d.p ** 2),
}


def materialize(specs, backward):
    """The op's arguments, and those to differentiate when timing the backward."""
    args = [torch.randn(s.shape, dtype=s.dtype, device=DEVICE, requires_grad=backward
                        and s.trainable) if isinstance(s, Input) else s for s in specs]
    return args, [a for a in args if torch.is_tensor(a) and a.requires_grad]


def implementation(name, variant):
    if variant == "triton":
        needs_cuda(variant)
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
    inputs, macs = OPS[name]
    backward = pass_ == "forward+backward"
    args, leaves = materialize(inputs(d), backward)
    preset, image, batch = size
    measure(timed_call(fn, args, leaves), f"{name} {pass_} {preset}", "kernel", variant,
            baseline=variant == VARIANTS[0], images=batch,
            flops=2 * macs(d) * batch * (3 if backward else 1), preset=preset,
            shape=f"{batch}x{image}px", op=name, pass_=pass_)
