"""Sampling latency and throughput: Heun with classifier-free guidance on t in [0.1, 1] (the
last step Euler), at batch 1 (ms per image) and larger batches (images/s), run eagerly (the
baseline) or replayed as one CUDA graph per trajectory (CUDA only)."""
import pytest
import torch

from conftest import DEVICE, ON_CUDA, needs_cuda
from jitfast.bench import forward_flops
from jitfast.sampling import Grid
from jitfast.workloads import SAMPLE_VARIANTS, sampler

# (preset, image size, ODE steps, batches)
SIZE = ("JiT-B/16", 256, 50, (1, 16, 128, 256)) if ON_CUDA else ("JiT-T/8", 64, 8, (1, 8))
CFG, INTERVAL = 2.9, (0.1, 1.0)


def network_passes(steps):
    """Images through the network per sampled image: one per Heun/Euler evaluation, two where
    guidance is on (its conditional and unconditional halves)."""
    grid = Grid.make(steps, CFG, INTERVAL, torch.device("cpu"))
    return sum(2 if grid.guided[k] else 1 for _, k, _ in grid.evaluations("heun"))


@pytest.mark.parametrize("variant", list(SAMPLE_VARIANTS))
@pytest.mark.parametrize("batch", SIZE[3])
def test_sampling(measure, batch, variant):
    if SAMPLE_VARIANTS[variant]:
        needs_cuda(variant)
    preset, image, steps, _ = SIZE
    measure(sampler(preset, image, steps, batch, variant, DEVICE, CFG, INTERVAL),
            f"sample {preset} batch {batch}", "sample", variant,
            baseline=variant == next(iter(SAMPLE_VARIANTS)), images=batch,
            flops=forward_flops(preset, image) * batch * network_passes(steps), preset=preset,
            shape=f"{batch}x{image}px, {steps} Heun steps, cfg {CFG} on {list(INTERVAL)}")
