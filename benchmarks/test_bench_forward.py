"""The network's forward pass under each attention computation (CPU): float32 scores in
explicit matmuls as the official code computes them (the baseline), SDPA pinned to its math
path (what jitfast ran before), and SDPA's own dispatch (what jitfast runs on the CPU now)."""
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import DEVICE, ON_CUDA
from jitfast.measure.throughput import forward_flops
from jitfast.network.presets import build

PRESET, IMAGE, BATCH = "JiT-B/16", 256, 2
# variant -> (attn_scores_fp32, SDPA backends pinned around the forward or None)
VARIANTS = {"official fp32 scores": (True, None), "sdpa math pinned": (False, [SDPBackend.MATH]),
            "sdpa dispatch": (False, None)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward(measure, variant):
    if ON_CUDA:
        pytest.skip("measures the CPU's attention dispatch; CUDA pins its backends")
    scores_fp32, pinned = VARIANTS[variant]
    torch.manual_seed(0)
    net = build(PRESET, input_size=IMAGE, num_classes=1000, attn_scores_fp32=scores_fp32)
    net = net.to(DEVICE).eval()
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device=DEVICE)
    t, y = torch.rand(BATCH, device=DEVICE), torch.randint(1000, (BATCH,), device=DEVICE)

    def forward():
        with torch.no_grad(), sdpa_kernel(pinned) if pinned else nullcontext():
            net(x, t, y)
    measure(forward, f"forward {PRESET} batch {BATCH}", "forward", variant,
            baseline=variant == next(iter(VARIANTS)), images=BATCH,
            flops=forward_flops(PRESET, IMAGE) * BATCH, preset=PRESET,
            shape=f"{BATCH}x{IMAGE}px")
