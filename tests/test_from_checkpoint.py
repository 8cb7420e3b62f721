"""One sampler per checkpoint: ``python -m jitfast.sample``, ``python -m jitfast.export``, the
sampler experiments and the training run's own sample grid take the same Denoiser settings from
a checkpoint, and what a checkpoint does not record gets the documented defaults."""
import argparse
import importlib
import json

import pytest
import torch

from jitfast import EMA, Denoiser, JiT, save_checkpoint, train
from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint, sampler_settings
from jitfast.experiments import samplers
from jitfast.export import main as export_main
from jitfast.sample import main as sample_main

TRAIN = ["--model", "JiT-T/4", "--image-size", "8", "--batch-size", "2", "--steps", "1",
         "--sample-steps", "2", "--samples-per-class", "1", "--grid-classes", "1",
         "--device", "cpu", "--cpu-threads", "1", "--noise-scale", "1.5"]
RECORDED = dict(noise_scale=1.5, t_eps=0.1, pred="v")  # none of them the default
TINY = dict(patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            bottleneck_dim=8, in_context_len=0, backend="torch")


@pytest.fixture(autouse=True)
def restore_threads():
    """The training run sets torch's thread count (--cpu-threads 1)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def settings_of(denoiser):
    return dict(noise_scale=denoiser.noise_scale, t_eps=denoiser.t_eps, pred=denoiser.pred)


@pytest.fixture
def sampled(monkeypatch):
    """The settings of every Denoiser that generates images from now on."""
    seen, generate = [], Denoiser.generate
    monkeypatch.setattr(Denoiser, "generate", lambda self, *a, **k: seen.append(
        settings_of(self)) or generate(self, *a, **k))
    return seen


def exported(monkeypatch, ckpt, out):
    """The sampler settings ``python -m jitfast.export`` puts in the package of `ckpt` (the
    compilation itself left out: it takes half a minute)."""
    packaged = {}
    monkeypatch.setattr(importlib.import_module("jitfast.export"), "export_sampler",
                        lambda sampler, *args: packaged.update(sampler.package_settings()))
    export_main(["--ckpt", ckpt, "--out", str(out)])
    return {k: packaged[k] for k in RECORDED}


def experimented(monkeypatch, ckpt, out):
    """The settings of the Denoiser ``python -m jitfast.experiments.samplers`` measures."""
    measured = []
    monkeypatch.setattr(samplers, "grid_time", lambda denoiser, *a: measured.append(
        settings_of(denoiser)))
    samplers.main(["--ckpt", ckpt, "--out", str(out), "--part", "grid"])
    return measured[0]


def test_sample_export_and_the_training_grid_sample_alike(tmp_path, monkeypatch, sampled):
    """A run whose args record t_eps 0.1, v-prediction and noise 1.5: its grid, the sample
    command and the exported package all sample with them (sample used t_eps 0.05 and
    x-prediction whatever the checkpoint said)."""
    parse_args = train.parse_args  # train has no --t-eps/--pred: a run's args that held them
    monkeypatch.setattr(train, "parse_args", lambda argv: argparse.Namespace(
        **{**vars(parse_args(argv)), **RECORDED}))
    run = train.main(TRAIN + ["--out", str(tmp_path / "run")])
    assert settings_of(run["denoiser"]) == RECORDED and sampled == [RECORDED]  # the grid
    sample_main(["--ckpt", run["checkpoint"], "--out", str(tmp_path / "s"), "--classes", "0",
                 "--steps", "1", "--device", "cpu"])
    assert sampled == [RECORDED] * 2
    manifest = json.loads((tmp_path / "s" / "run.json").read_text())
    assert (manifest["noise_scale"], manifest["t_eps"]) == (1.5, 0.1)
    assert exported(monkeypatch, run["checkpoint"], tmp_path / "m.pt2") == RECORDED
    assert experimented(monkeypatch, run["checkpoint"], tmp_path / "e") == RECORDED


@pytest.mark.parametrize("args", [None, {}, {"noise_scale": None}, argparse.Namespace(lr=1.0)],
                         ids=["no args", "empty dict", "None recorded", "official Namespace"])
def test_unrecorded_settings_get_the_defaults(args):
    """t_eps 0.05, x-prediction, noise std 1.0 and 2.0 from 512 px (the official README)."""
    for size, noise in ((256, 1.0), (511, 1.0), (512, 2.0), (1024, 2.0)):
        assert sampler_settings(args, size) == dict(noise_scale=noise, t_eps=0.05, pred="x")
    given = sampler_settings(args, 512, noise_scale=3.0, t_eps=0.2)  # command-line flags
    assert given == dict(noise_scale=3.0, t_eps=0.2, pred="x")


@pytest.mark.parametrize("size, noise", [(32, 1.0), (512, 2.0)])
def test_a_checkpoint_without_args_samples_with_the_defaults(tmp_path, monkeypatch, size, noise):
    """Every reader of a checkpoint without training args: the 512-px rule included (the
    sampler experiments used noise 1.0 at any size)."""
    net = JiT(input_size=size, **TINY).eval()
    ckpt = str(tmp_path / "checkpoint.pt")
    save_checkpoint(ckpt, Denoiser(net), EMA(Denoiser(net)))
    defaults = dict(noise_scale=noise, t_eps=0.05, pred="x")
    assert settings_of(denoiser_from_checkpoint(ckpt, backend="torch")) == defaults
    assert exported(monkeypatch, ckpt, tmp_path / "m.pt2") == defaults
    assert experimented(monkeypatch, ckpt, tmp_path / "e") == defaults
    given = denoiser_from_checkpoint(ckpt, "model", noise_scale=0.5, t_eps=0.01,
                                     dtype=torch.bfloat16)
    assert settings_of(given) == dict(noise_scale=0.5, t_eps=0.01, pred="x")
    assert next(given.net.parameters()).dtype == torch.bfloat16
