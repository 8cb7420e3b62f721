"""Sampling latency and throughput: Heun with classifier-free guidance on t in [0.1, 1] (the
last step Euler), at batch 1 (ms per image) and larger batches (images/s), run eagerly (the
baseline) or replayed as one CUDA graph per trajectory (CUDA only); and beside it the fast
settings that matched Heun-50's accuracy on a trained JiT (docs/samplers.md), so that a GPU run
gives the time to an image of Heun-50 accuracy; and pMF's one-step sampler (PMFSampler, its
guidance the network's own input) in the same groups, so that the report shows its time to an
image beside both (its speedup is over Heun-50 run eagerly)."""
import types

import pytest

from conftest import DEVICE, ON_CUDA, skip_unless_cuda
from jitfast.diffusion.sampling import make_time_grid
from jitfast.measure.throughput import forward_flops, pmf_forward_flops
from jitfast.measure.workloads import SAMPLE_VARIANTS, pmf_config, pmf_sampler, sampler
from jitfast.network.pmf_presets import PMF_SAMPLING

# (preset, image size, ODE steps, batches)
SIZE = ("JiT-B/16", 256, 50, (1, 16, 128, 256)) if ON_CUDA else ("JiT-T/8", 64, 8, (1, 8))
CFG, INTERVAL = 2.9, (0.1, 1.0)
# name -> (method, steps, schedule): Heun-50's trajectory error, and its judge's quality
MATCHED = {"unipc2-cosine-15": ("unipc2", 15, "cosine"),
           "unipc2-cosine-10": ("unipc2", 10, "cosine")}
MATCHED_BATCHES = (1, 128) if ON_CUDA else (1, 8)
LARGER = ("JiT-L/16",) if ON_CUDA else ()  # presets sampled at batch 1 beside SIZE's
# pMF: (network, image size, batches, the JiT preset in whose groups it is shown), one step.
# On the CPU, where JiT-B/16 does not run, a pMF of JiT-T/8's width and depth at its 64 px
# (workloads.PMF_CUSTOM) sits beside JiT-T/8's rows, and pMF-B/16 (≈ 0.5 s a forward on 2
# cores) at batch 1 in a group of its own; pMF-H/16 (≈ 8x the FLOPs) is left to the GPU.
PMF_SIZES = (("pMF-B/16", 256, (1, 128), "JiT-B/16"), ("pMF-H/16", 256, (1, 128), "JiT-B/16")) \
    if ON_CUDA else (("pMF-T/8", 64, (1, 8), "JiT-T/8"), ("pMF-B/16", 256, (1,), "JiT-B/16"))
PMF_STEPS = 1
PMF_ROWS = [(batch, variant, name, image, peer) for name, image, batches, peer in PMF_SIZES
            for batch in batches for variant in SAMPLE_VARIANTS]


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


def measure_heun(measure, preset, image, steps, batch, variant):
    """Heun with guidance, `steps` steps, in the group of its preset and batch (eager the
    baseline)."""
    if SAMPLE_VARIANTS[variant]:
        skip_unless_cuda(variant)
    measure(sampler(preset, image, steps, batch, variant, DEVICE, CFG, INTERVAL),
            f"sample {preset} batch {batch}", "sample", variant,
            baseline=variant == next(iter(SAMPLE_VARIANTS)), images=batch,
            flops=forward_flops(preset, image) * batch * network_passes("heun", steps),
            preset=preset, shape=shape(batch, image, f"{steps} Heun steps"))


@pytest.mark.parametrize("variant", list(SAMPLE_VARIANTS))
@pytest.mark.parametrize("batch", SIZE[3])
def test_sampling(measure, batch, variant):
    preset, image, steps, _ = SIZE
    measure_heun(measure, preset, image, steps, batch, variant)


@pytest.mark.parametrize("variant", list(SAMPLE_VARIANTS))
@pytest.mark.parametrize("preset", LARGER)
def test_sampling_larger(measure, preset, variant):
    """A larger preset's Heun-50 at batch 1 (on CUDA): JiT-L/16, whose SwiGLU weights the
    sampler pads once a trajectory (benchmarks/NOTES.md)."""
    measure_heun(measure, preset, 256, 50, 1, variant)


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


@pytest.mark.parametrize("batch,variant,name,image,peer", PMF_ROWS,
                         ids=[f"{b}-{v}-{n}" for b, v, n, _, _ in PMF_ROWS])
def test_sampling_pmf(measure, batch, variant, name, image, peer):
    """pMF's one-step sampling, eager and graphed (one CUDA graph per trajectory), in the
    groups of test_sampling's JiT at the same image size (on CUDA: JiT-B/16 at 256 px),
    compared with the group's baseline, JiT's Heun run eagerly (on the CPU pMF-B/16's group
    has none)."""
    if SAMPLE_VARIANTS[variant]:
        skip_unless_cuda(variant)
    _, omega, interval = PMF_SAMPLING.get(name, (1.0, 1.0, (0.0, 1.0)))  # PMFSampler's defaults
    measure(pmf_sampler(name, image, PMF_STEPS, batch, variant, DEVICE),
            f"sample {peer} batch {batch}", "sample", f"pmf-{PMF_STEPS}step {variant}",
            baseline=False, images=batch,
            flops=pmf_forward_flops(pmf_config(name, image)) * batch * PMF_STEPS, preset=name,
            shape=f"{batch}x{image}px, pMF {PMF_STEPS} step, omega {omega} on {list(interval)} "
                  f"(network inputs)")
