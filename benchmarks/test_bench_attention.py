"""SDPA's CUDA backends for JiT's attention, forward and backward: each backend pinned alone
(cuDNN, FlashAttention-2, memory-efficient) and jitfast's choice (``jitfast.network.attention``, the
baseline), in bf16 at 288 tokens (256 patches + 32 in-context) and head dims 64 (B/16, L/16)
and 80 (H/16). CUDA only: the CPU's attention is measured in test_bench_forward.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import DEVICE, skip_unless_cuda
from jitfast.network.attention import attention

# (model, batch, heads, head dim)
SHAPES = [("JiT-B/16", 128, 12, 64), ("JiT-L/16", 64, 16, 64), ("JiT-H/16", 64, 16, 80)]
TOKENS = 288
VARIANTS = {"jitfast": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_attention(measure, pass_, shape, variant):
    skip_unless_cuda(f"SDPA's CUDA backend {variant}")
    name, B, H, hd = shape
    q, k, v = (torch.randn(B, H, TOKENS, hd, device=DEVICE, dtype=torch.bfloat16,
                           requires_grad=pass_ != "forward") for _ in range(3))
    grad = torch.randn_like(q)

    def forward():
        if VARIANTS[variant] is None:
            return attention(q, k, v)
        with sdpa_kernel([VARIANTS[variant]]):
            return F.scaled_dot_product_attention(q, k, v)

    def call():
        out = forward()
        if pass_ != "forward":
            torch.autograd.grad(out, (q, k, v), grad)
    try:
        call()
    except RuntimeError as err:  # a backend that does not take these inputs on this card
        pytest.skip(f"{variant}: {str(err).splitlines()[0]}")
    flops = 4 * B * H * TOKENS * TOKENS * hd * (3.5 if pass_ != "forward" else 1)
    measure(call, f"attention {pass_} {name}", "kernel", variant,
            baseline=variant == next(iter(VARIANTS)), images=B, flops=flops, preset=name,
            shape=f"{B}x{H}x{TOKENS}x{hd}")
