"""Sampling latency and throughput: Heun with classifier-free guidance on t in [0.1, 1] (the
last step Euler), batch 1 (ms per image) and a large batch (images/s), each network evaluation
run eagerly (the baseline) or replayed from a captured CUDA graph (CUDA only)."""
import pytest
import torch

from conftest import DEVICE, ON_CUDA, needs_cuda
from jitfast.bench import forward_flops
from jitfast.diffusion import Denoiser
from jitfast.presets import build
from jitfast.sampling import guidance_weights

# (preset, image size, ODE steps, batches)
SIZE = ("JiT-B/16", 256, 50, (1, 128)) if ON_CUDA else ("JiT-T/8", 64, 8, (1, 8))
CFG, INTERVAL = 2.9, (0.1, 1.0)
VARIANTS = ("eager", "graphs")  # the first is the baseline
NUM_CLASSES = 1000


def network_passes(steps):
    """Images through the network per sampled image: one per Heun/Euler evaluation, two where
    guidance is on (its conditional and unconditional halves)."""
    w = guidance_weights(torch.linspace(0.0, 1.0, steps + 1), CFG, INTERVAL)
    evaluations = list(range(steps)) + list(range(1, steps))  # Heun's second ones: i + 1 < steps
    return sum(2 if w[i] != 1.0 else 1 for i in evaluations)


def sampler(preset, image, steps, batch, cuda_graphs):
    torch.manual_seed(0)
    net = build(preset, input_size=image, num_classes=NUM_CLASSES).to(DEVICE)
    if ON_CUDA:
        net = net.to(torch.bfloat16)  # as python -m jitfast.sample runs it
    denoiser = Denoiser(net)
    y = torch.randint(NUM_CLASSES, (batch,), device=DEVICE)
    z0 = torch.randn(batch, 3, image, image, device=DEVICE)
    return lambda: denoiser.generate(y, steps, "heun", CFG, INTERVAL, z0,
                                     cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", SIZE[3])
def test_sampling(measure, batch, variant):
    if variant == "graphs":
        needs_cuda(variant)
    preset, image, steps, _ = SIZE
    measure(sampler(preset, image, steps, batch, variant == "graphs"),
            f"sample {preset} batch {batch}", "sample", variant, baseline=variant == VARIANTS[0],
            images=batch, flops=forward_flops(preset, image) * batch * network_passes(steps),
            preset=preset, shape=f"{batch}x{image}px, {steps} Heun steps, cfg {CFG} on "
                                 f"{list(INTERVAL)}")
