"""Resolution transfer: the child computes the nearest upsampling of its parent's output on the
nearest upsampling of its input, and bad requests are refused."""
import pytest
import torch
import torch.nn.functional as F
from test_train import run

from jitfast import (PMF, Denoiser, JiT, TransferError, load_checkpoint, read_checkpoint, train,
                     transfer)

TINY = dict(in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=7,
            bottleneck_dim=5, in_context_len=3, in_context_start=1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_parent(size, patch, backend="torch"):
    """A tiny JiT with every parameter random (the zero-initialised adaLN and output layers
    included, so that every part of the network shapes the output)."""
    torch.manual_seed(0)
    net = JiT(input_size=size, patch_size=patch, backend=backend, **TINY)
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:  # not the fixed sin-cos table
                param.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("size, patch, k", [(12, 2, 2), (8, 2, 3)])
def test_child_of_upsampled_input_is_upsampled_parent(backend, size, patch, k):
    parent = random_parent(size, patch, backend)
    child = transfer(parent, size * k, patch * k)
    assert (child.input_size, child.patch_size, child.backend) == (size * k, patch * k, backend)
    z = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.1, 0.5, 0.97]), torch.tensor([0, 6, 7])  # 7: the null class
    with torch.no_grad():
        want = F.interpolate(parent(z, t, y), scale_factor=k, mode="nearest")
        got = child(F.interpolate(z, scale_factor=k, mode="nearest"), t, y)
    assert want.abs().mean() > 0.1  # not trivially zero
    assert rel_err(got, want) < 1e-5
    # Any input: the child reads the k×k block averages and writes a nearest upsampling.
    x = torch.randn(3, 3, size * k, size * k, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = F.interpolate(parent(F.avg_pool2d(x, k), t, y), scale_factor=k, mode="nearest")
        assert rel_err(child(x, t, y), want) < 1e-5

@pytest.mark.parametrize("size, patch, k", [(12, 2, 2), (8, 2, 3)])
def test_pmf_child_of_upsampled_input_is_upsampled_parent(size, patch, k):
    """pMF: both heads' velocities (z - x̂)/t, the u-head's and the training v-head's."""
    torch.manual_seed(0)
    parent = PMF(input_size=size, patch_size=patch, hidden_size=32, depth=3, head_depth=1,
                 num_heads=2, num_classes=7, bottleneck_dim=5, v_head=True, backend="torch")
    with torch.no_grad():
        for param in parent.parameters():
            param.normal_(0, 0.2)
    child = transfer(parent.eval(), size * k, patch * k)
    assert child.config == {**parent.config, "input_size": size * k, "patch_size": patch * k}
    z = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    t, h = torch.tensor([0.1, 0.5, 0.97]), torch.tensor([0.05, 0.5, 0.3])
    omega, t_min, t_max = torch.tensor([1.0, 2.0, 7.5]), torch.zeros(3), torch.full((3,), 0.7)
    y = torch.tensor([0, 6, 7])  # 7: the null class
    up = lambda a: F.interpolate(a, scale_factor=k, mode="nearest")
    with torch.no_grad():
        want = [up(v) for v in parent.velocities(z, t, h, omega, t_min, t_max, y)]
        got = child.velocities(up(z), t, h, omega, t_min, t_max, y)
    for a, b in zip(got, want):
        assert b.abs().mean() > 0.1  # not trivially zero
        assert rel_err(a, b) < 1e-5


def test_body_is_shared_and_the_parent_untouched():
    parent = random_parent(12, 2)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = transfer(parent, 24, 4)
    changed = {"x_embedder.proj1.weight", "final_layer.linear.weight", "final_layer.linear.bias"}
    for name, value in child.state_dict().items():
        assert torch.equal(parent.state_dict()[name], before[name])
        if name not in changed:
            assert torch.equal(value, before[name]), name
    assert child.x_embedder.proj1.weight.shape == (5, 3, 4, 4)
    assert child.final_layer.linear.weight.shape == (4 * 4 * 3, 32)
    assert child.config == {**parent.config, "input_size": 24, "patch_size": 4}
    child.x_embedder.proj1.weight.data.zero_()  # a copy, not a view of the parent's
    assert torch.equal(parent.x_embedder.proj1.weight, before["x_embedder.proj1.weight"])


def test_refusals_say_what_is_wrong():
    parent = random_parent(12, 2)
    with pytest.raises(TransferError, match="patch size 5 does not divide image size 24"):
        transfer(parent, 24, 5)
    with pytest.raises(TransferError, match="factor 18/12 = 1.5 is not an integer"):
        transfer(parent, 18, 3)
    with pytest.raises(TransferError, match="factor 6/12 = 0.5 is not an integer"):
        transfer(parent, 6, 1)
    with pytest.raises(TransferError, match=r"12x12 token grid, the model's is 6x6: .* "
                                            r"interpolated"):
        transfer(parent, 24, 2)
    with pytest.raises(TypeError, match="needs a jitfast.JiT"):
        transfer(torch.compile(parent), 24, 4)


def test_init_from_a_trained_checkpoint(tmp_path, capsys):
    """`python -m jitfast.train --init-from`: a JiT-T/4 at 8 px becomes a JiT-T/8 at 16 px with
    the noise scale doubled, a fresh optimizer, both EMAs started from the transferred weights
    and the parent in its checkpoint; resuming it needs its noise scale."""
    parent = run(tmp_path, "parent", "--model", "JiT-T/4", "--image-size", "8", "--steps", "2")
    capsys.readouterr()
    child = run(tmp_path, "child", "--init-from", parent["checkpoint"], "--steps", "1")
    assert (f"init from {parent['checkpoint']} (ema1, step 2): 8 px patch 4 -> 16 px patch 8 "
            f"(factor 2); noise scale 2 (the parent's 1 x 2; --noise-scale overrides)"
            in capsys.readouterr().err)
    ckpt = read_checkpoint(child["checkpoint"])
    assert ckpt["args"]["noise_scale"] == 2.0 and child["denoiser"].noise_scale == 2.0
    assert ckpt["args"]["parent"]["path"] == parent["checkpoint"]
    assert (ckpt["args"]["parent"]["step"], ckpt["args"]["parent"]["weights"]) == (2, "ema1")
    assert [s["step"].item() for s in ckpt["optimizer"]["state"].values()] == [1.0] * len(
        ckpt["optimizer"]["state"])  # a fresh optimizer: one step, not the parent's three
    # One step in: ema_k = d_k·start + (1 - d_k)·weights, so each EMA gives back its start.
    start = transfer(load_checkpoint(parent["checkpoint"]), 16, 8).state_dict()
    for key, decay in (("model_ema1", 0.99), ("model_ema2", 0.98)):
        for name, value in ckpt[key].items():
            began = (value - (1 - decay) * ckpt["model"][name]) / decay
            assert torch.allclose(began, start[name.removeprefix("net.")], atol=1e-6), name
    # Resuming the child: with its noise scale, and its parent stays recorded.
    more = ["--steps", "2", "--resume", child["checkpoint"]]
    with pytest.raises(train.TrainingError, match="trained with noise scale 2, this run has 1: "
                                                  "pass --noise-scale 2"):
        run(tmp_path, "child", *more)
    resumed = run(tmp_path, "child", *more, "--noise-scale", "2")
    assert read_checkpoint(resumed["checkpoint"])["args"]["parent"] == ckpt["args"]["parent"]


def test_init_from_refusals(tmp_path, capsys):
    parent = run(tmp_path, "parent", "--model", "JiT-T/4", "--image-size", "8", "--steps", "1")
    child = run(tmp_path, "given", "--init-from", parent["checkpoint"], "--steps", "1",
                "--noise-scale", "3", "--init-weights", "model")
    assert "(model, step 1)" in capsys.readouterr().err
    assert child["denoiser"].noise_scale == 3.0
    with pytest.raises(SystemExit):
        run(tmp_path, "both", "--init-from", parent["checkpoint"], "--resume", parent["checkpoint"])
    assert "--init-from starts a new run, --resume continues one" in capsys.readouterr().err
    with pytest.raises(TransferError, match=r"--model JiT-S/8 is not the architecture of .* "
                                            r"\(depth 6 vs 8, hidden_size 192 vs 256"):
        run(tmp_path, "other", "--init-from", parent["checkpoint"], "--model", "JiT-S/8")
    with pytest.raises(TransferError, match="is a 3x3 token grid, the model's is 2x2"):
        run(tmp_path, "grid", "--init-from", parent["checkpoint"], "--image-size", "24")


def test_transferred_sampler_draws_the_parents_images_upsampled():
    """docs/design.md §8's noise rule, exactly: the child at noise scale k·s from start noise z0
    follows the parent's ODE on the k×k block averages, whose start noise s·(k·avg z0) has the
    parent's distribution; its within-block part decays, and the last Euler step removes it.
    So its images are the parent's images (from k·avg z0), upsampled."""
    parent, k = random_parent(12, 2), 2
    child = transfer(parent, 24, 4)
    y = torch.tensor([0, 3, 6, 2])
    z0 = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    parent_z0 = k * F.avg_pool2d(z0, k)
    assert abs(parent_z0.std().item() - 1) < 0.06  # a standard-normal start for the parent
    settings = dict(steps=4, cfg=2.0, interval=(0.1, 0.8))
    images = Denoiser(child, noise_scale=2.0).generate(y, z0=z0, **settings)
    want = Denoiser(parent, noise_scale=1.0).generate(y, z0=parent_z0, **settings)
    assert want.std() > 0.1
    assert rel_err(images, F.interpolate(want, scale_factor=k, mode="nearest")) < 1e-5
