"""The ODE sampler: official parity, known answers, CFG batching and skipping, bad input."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from jitfast import Denoiser, JiT
from jitfast.diffusion.sampling import evaluation, guidance_weights

OFFICIAL = torch.load(Path(__file__).parent / "fixtures" / "official_tiny.pt", weights_only=True)


def official_net(backend="torch"):
    net = JiT(**OFFICIAL["config"], backend=backend)
    net.load_state_dict(OFFICIAL["state_dict"])
    return net.eval()


class ClassImages(nn.Module):
    """The exact x-prediction when class k's data is the single image images[k]: it returns that
    image whatever z and t are. The last row is the null class's answer."""

    def __init__(self, images):
        super().__init__()
        self.images = images
        self.num_classes = images.shape[0] - 1
        self.in_channels, self.input_size = images.shape[1], images.shape[-1]
        self.dummy = nn.Parameter(torch.zeros(()))
        self.batch_sizes = []

    def forward(self, z, t, y):
        self.batch_sizes.append(z.shape[0])
        return self.images[y]


@pytest.mark.parametrize("run", range(len(OFFICIAL["sampling"])))
def test_generate_matches_official(run, backend):
    """On the triton backend, each evaluation's velocity, guidance and state update are fused
    into the output head."""
    s = OFFICIAL["sampling"][run]
    denoiser = Denoiser(official_net(backend), noise_scale=s["noise_scale"], t_eps=s["t_eps"])
    out = denoiser.generate(s["labels"], steps=s["steps"], method=s["method"], cfg=s["cfg"],
                            interval=tuple(s["interval"]), z0=s["z0"])
    err = ((out - s["expected"]).norm() / s["expected"].norm()).item()
    assert out.dtype == torch.float32 and err < 1e-5


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_reaches_the_single_training_image(method):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    denoiser = Denoiser(ClassImages(images), noise_scale=2.0)
    y = torch.tensor([0, 2, 1])
    out = denoiser.generate(y, steps=9, method=method)
    assert torch.allclose(out, images[y], atol=1e-5)


def test_guidance_reaches_the_extrapolated_image():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    denoiser = Denoiser(ClassImages(images))
    y = torch.tensor([1, 0])
    out = denoiser.generate(y, steps=6, cfg=2.5)
    expected = images[2] + 2.5 * (images[y] - images[2])  # v_u + w(v_c - v_u), linear in x
    assert torch.allclose(out, expected, atol=1e-4)


def reference_generate(denoiser, y, z0, steps, method, cfg, interval):
    """The official loop: cond and uncond as separate passes at every evaluation."""
    net, ts = denoiser.net, torch.linspace(0, 1, steps + 1)
    null = torch.full_like(y, denoiser.num_classes)

    def velocity(z, t):
        tt = t.expand(z.shape[0])
        v_c = (net(z, tt, y) - z) / (1 - t).clamp_min(denoiser.t_eps)
        v_u = (net(z, tt, null) - z) / (1 - t).clamp_min(denoiser.t_eps)
        lo, hi = interval
        w = cfg if (t < hi) and (lo == 0 or t > lo) else 1.0
        return v_u + w * (v_c - v_u)

    z = denoiser.noise_scale * z0
    for i in range(steps):
        v = velocity(z, ts[i])
        if method == "heun" and i < steps - 1:
            v = 0.5 * (v + velocity(z + (ts[i + 1] - ts[i]) * v, ts[i + 1]))
        z = z + (ts[i + 1] - ts[i]) * v
    return z


@pytest.mark.parametrize("precompute", [True, False])
def test_batched_guidance_equals_separate_passes_and_skips_uncond(precompute, monkeypatch):
    """Also: the run's conditioning computed once (rows sliced per evaluation) or per
    evaluation by the network (large batches) give the official loop's images."""
    if not precompute:
        monkeypatch.setattr(evaluation, "CONDITIONING_BUDGET", 0)
    net = official_net()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    denoiser = Denoiser(net)
    y = torch.tensor([3, 8, 1])
    z0 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = denoiser.generate(y, steps=5, method="heun", cfg=3.0, interval=(0.3, 0.7), z0=z0)
    # grid 0, .2, .4, .6, .8, 1: guidance only at .4 and .6, so only those evaluations batch 2B
    weights = guidance_weights(torch.linspace(0, 1, 6), 3.0, (0.3, 0.7))
    assert weights == [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]
    assert calls == [3, 3, 3, 6, 6, 6, 6, 3, 3]
    calls.clear()
    expected = reference_generate(denoiser, y, z0, 5, "heun", 3.0, (0.3, 0.7))
    assert len(calls) == 2 * 9
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_seeded_sampling_is_reproducible_and_restores_training_mode():
    net = official_net().train()
    denoiser = Denoiser(net)
    y = torch.tensor([1, 2])
    a = denoiser.generate(y, steps=2, generator=torch.Generator().manual_seed(7))
    b = denoiser.generate(y, steps=2, generator=torch.Generator().manual_seed(7))
    c = denoiser.generate(y, steps=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert net.training


def test_no_value_checks_per_evaluation_and_flag_restored():
    """generate validates y and t once; the network's per-call range checks (a host sync each
    on CUDA) are off while it samples and back on afterwards."""
    net = official_net()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(module.check_values))
    Denoiser(net).generate(torch.tensor([1, 2]), steps=3, cfg=2.0)
    assert seen == [False] * 5 and net.check_values


def test_float32_state_with_a_bf16_network():
    denoiser = Denoiser(official_net().to(torch.bfloat16))
    out = denoiser.generate(torch.tensor([1, 2]), steps=3, cfg=2.0,
                            generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(method="rk4"), "method must be one of"),
    (dict(cfg=-1.0), "cfg must be >= 0"),
    (dict(interval=(0.5, 1.2)), "interval must satisfy"),
    (dict(interval=(0.7, 0.2)), "interval must satisfy"),
    (dict(z0=torch.zeros(2, 3, 16, 16)), r"z0 must have shape \(2, 3, 32, 32\)"),
])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Denoiser(official_net()).generate(torch.tensor([1, 2]), **kwargs)


def test_bad_labels():
    denoiser = Denoiser(official_net())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\].*12"):
        denoiser.generate(torch.tensor([1, 12]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        denoiser.generate(torch.tensor([1.0, 2.0]))
