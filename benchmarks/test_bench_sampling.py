"""Sampling latency and throughput: Heun with classifier-free guidance on t in [0.1, 1] (the
last step Euler), at batch 1 (ms per image) and larger batches (images/s), run eagerly (the
baseline) or replayed as one CUDA graph per trajectory (CUDA only); and beside it the fast
settings that matched Heun-50's accuracy on a trained JiT (docs/samplers.md), so that a GPU run
gives the time to an image of Heun-50 accuracy."""
import types

import pytest

from conftest import DEVICE, ON_CUDA, skip_unless_cuda
from jitfast.diffusion.sampling import make_time_grid
from jitfast.measure.throughput import forward_flops
from jitfast.measure.workloads import SAMPLE_VARIANTS, sampler

# (preset, image size, ODE steps, batches)
SIZE = ("JiT-B/16", 256, 50, (1, 16, 128, 256)) if ON_CUDA else ("JiT-T/8", 64, 8, (1, 8))
CFG, INTERVAL = 2.9, (0.1, 1.0)
# name -> (method, steps, schedule): Heun-50's trajectory error, and its judge's quality
MATCHED = {"unipc2-cosine-15": ("unipc2", 15, "cosine"),
           "unipc2-cosine-10": ("unipc2", 10, "cosine")}
MATCHED_BATCHES = (1, 128) if ON_CUDA else (1, 8)


def network_passes(method, steps, schedule="linear"):
    """Images through the network per sampled image: one per evaluation, two where guidance is
    on (its conditional and unconditional halves)."""
    defaults = types.SimpleNamespace(t_eps=0.05, P_mean=-0.8, P_std=0.8)  # Denoiser's
    time_grid = make_time_grid(defaults, steps, method, CFG, INTERVAL, schedule, "cpu")
    if method == "heun":
        return sum(2 if time_grid.guided[k] else 1 for _, k, _ in time_grid.evaluations("heun"))
    return sum(2 if guided else 1 for guided in time_grid.guided)


def shape(batch, image, what):
    return f"{batch}x{image}px, {what}, cfg {CFG} on {list(INTERVAL)}"


@pytest.mark.parametrize("variant", list(SAMPLE_VARIANTS))
@pytest.mark.parametrize("batch", SIZE[3])
def test_sampling(measure, batch, variant):
    if SAMPLE_VARIANTS[variant]:
        skip_unless_cuda(variant)
    preset, image, steps, _ = SIZE
    measure(sampler(preset, image, steps, batch, variant, DEVICE, CFG, INTERVAL),
            f"sample {preset} batch {batch}", "sample", variant,
            baseline=variant == next(iter(SAMPLE_VARIANTS)), images=batch,
            flops=forward_flops(preset, image) * batch * network_passes("heun", steps),
            preset=preset, shape=shape(batch, image, f"{steps} Heun steps"))


@pytest.mark.parametrize("setting", MATCHED)
@pytest.mark.parametrize("variant", list(SAMPLE_VARIANTS))
@pytest.mark.parametrize("batch", MATCHED_BATCHES)
def test_sampling_matched(measure, batch, variant, setting):
    """The matched settings at batch 1 and 128 (on CUDA), in test_sampling's groups: compared
    with Heun-50 run eagerly."""
    if SAMPLE_VARIANTS[variant]:
        skip_unless_cuda(variant)
    preset, image, _, _ = SIZE
    method, steps, schedule = MATCHED[setting]
    measure(sampler(preset, image, steps, batch, variant, DEVICE, CFG, INTERVAL, method,
                    schedule),
            f"sample {preset} batch {batch}", "sample", f"{setting} {variant}", baseline=False,
            images=batch,
            flops=forward_flops(preset, image) * batch * network_passes(method, steps, schedule),
            preset=preset, shape=shape(batch, image, f"{method} {steps} steps ({schedule})"))
