"""pMF training through ``python -m jitfast.train --model pMF-...``: the recipe against the
official configs, a run end to end (metrics, grid, a checkpoint the sampler reads) and exact
resume. Two processes: tests/test_train_ddp.py."""
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from jitfast import TransferError, load_checkpoint, read_checkpoint, train, transfer
from jitfast.convert import main as convert_main
from jitfast.sample import main as sample_main
from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.network.pmf import PMF
from jitfast.training.progress import read_metrics

KEYS = json.loads((Path(__file__).parent / "fixtures" / "pmf_official_keys.json").read_text())
CONFIGS = json.loads((Path(__file__).parent / "fixtures" / "pmf_official_configs.json")
                     .read_text())["configs"]
TINY = ["--model", "pMF-T/4", "--image-size", "16", "--batch-size", "4", "--log-every", "1",
        "--samples-per-class", "2", "--grid-classes", "3", "--device", "cpu",
        "--cpu-threads", "1"]
pytestmark = pytest.mark.usefixtures("restore_threads")


def run(tmp_path, name, *extra):
    return train.main(TINY + ["--out", str(tmp_path / name), *extra])


@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_the_recipe_follows_the_official_config(preset):
    """Noise, guidance draws, the grid's one-step sampling, Muon with Adam's b2 at the constant
    lr without warm-up, the EDM EMAs, as configs/pMF_*_config.yml give them (a fixture of their
    values)."""
    official = CONFIGS[preset]
    args = train.parse_args(["--model", preset])
    sampling = official["sampling"]
    assert (args.P_mean, args.P_std, args.noise_scale, args.cfg_beta) == (
        official["P_mean"], official["P_std"], official["noise_scale"], official["cfg_beta"])
    assert (args.sample_steps, args.sample_cfg, args.sample_interval) == (
        sampling["num_steps"], sampling["omega"], [sampling["t_min"], sampling["t_max"]])
    assert (args.warmup_steps, args.schedule) == (official["warmup_epochs"], "constant")
    assert (args.optimizer, args.lr, args.blr) == ("muon", official["learning_rate"], None)
    assert official["ema_type"] == "edm" and args.ema_halflives == official["ema_val"]
    assert official["adam_b2"] == 0.95  # Muon's Adam part (training.muon.Muon's adam_betas)
    assert args.data_proportion == official["data_proportion"]
    terms = official["perceptual"]  # on in every config; here with --perceptual's networks
    assert terms["lpips"] and terms["convnext"]
    assert (args.perceptual, args.lpips_lambda, args.convnext_lambda, args.perceptual_max_t) == (
        None, terms["lpips_lambda"], terms["convnext_lambda"], terms["perceptual_max_t"])
    given = train.parse_args(["--model", preset, "--cfg-beta", "3", "--sample-cfg", "2"])
    assert (given.cfg_beta, given.sample_cfg) == (3.0, 2.0)
    own = train.parse_args(["--model", preset, "--blr", "1e-4", "--ema-decays", "0.9", "0.99"])
    assert (own.lr, own.blr, own.ema_halflives, own.ema_decays) == (None, 1e-4, None, [0.9, 0.99])


def test_a_pmf_run_end_to_end(tmp_path):
    """Metrics with the official loss parts, a one-step grid, a checkpoint with the v-head that
    load_checkpoint reads as a sampling network (without it) and with it on request, and that
    the sampler reads with the run's noise scale and guidance."""
    result = run(tmp_path, "run", "--steps", "3", "--noise-scale", "1.5", "--sample-cfg", "2.5",
                 "--sample-interval", "0.1", "0.9", "--ema-halflives", "1e-4", "1e-3", "1e-2")
    records = read_metrics(result["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # each adaptively weighted term is loss/(loss + 0.01), below 1
        assert 1.5 < r["loss"] < 2 and r["loss_u"] > 0 and r["loss_v"] > 0
    with Image.open(result["grid"]) as grid:
        assert grid.size == (2 * 16, 3 * 16)
    ckpt = read_checkpoint(result["checkpoint"])
    assert any(k.startswith("net.v_heads.") for k in ckpt["model"])
    weights = read_checkpoint(result["checkpoint"].replace(".pt", ".safetensors"))
    for k in (1, 2, 3):  # three EDM EMAs (0.1 to 10 images), in both files, each its own
        assert set(weights[f"model_ema{k}"]) == {n[len("net."):] for n in ckpt[f"model_ema{k}"]}
    assert not torch.equal(ckpt["model_ema1"]["net.pos_embed"], ckpt["model_ema3"]["net.pos_embed"])
    assert load_checkpoint(result["checkpoint"], weights="ema3").input_size == 16
    assert ckpt["args"]["model"] == "pMF-T/4" and ckpt["args"]["sample_steps"] == 1
    net = load_checkpoint(result["checkpoint"])
    assert isinstance(net, PMF) and not net.has_v_head and net.input_size == 16
    assert load_checkpoint(result["checkpoint"], v_head=True).has_v_head
    sampler = denoiser_from_checkpoint(result["checkpoint"])  # python -m jitfast.sample's
    assert (sampler.noise_scale, sampler.omega, sampler.interval) == (1.5, 2.5, (0.1, 0.9))
    command = ["--ckpt", result["checkpoint"], "--classes", "1", "--device", "cpu"]
    sample_main(command + ["--model", "pMF-T/4", "--out", str(tmp_path / "s")])  # its preset
    for other, why in (("pMF-T/8", r"patch_size 4 \(preset: 8\)"), ("JiT-T/4", "a pMF network")):
        with pytest.raises(SystemExit, match=f"not a {other}: .*{why}"):
            sample_main(command + ["--model", other, "--out", str(tmp_path / other[-1])])
    # the run folder in the published layout: the official key names (those of pMF-B/16's file,
    # block numbers aside), the v-head included, holding EMA 1's weights
    convert_main([str(tmp_path / "run"), str(tmp_path / "official.pt"), "--layout", "official"])
    published = torch.load(tmp_path / "official.pt", weights_only=True)
    blocks = lambda keys: {re.sub(r"\.\d+\.", ".N.", k) for k in keys}  # noqa: E731
    assert blocks(published) == blocks(KEYS["pmfDiT_B_16"]["keys"])
    ema1 = load_checkpoint(result["checkpoint"], v_head=True).state_dict()
    again = load_checkpoint(tmp_path / "official.pt", v_head=True).state_dict()
    assert all(torch.equal(ema1[k], again[k]) for k in ema1)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_a_resumed_pmf_run_repeats_the_uninterrupted_one(tmp_path, precision):
    common = ["--steps", "4", "--ckpt-every", "2", "--keep-checkpoints", "3",
              "--precision", precision]
    full = run(tmp_path, "full", *common)
    resumed = run(tmp_path, "resumed", *common, "--resume",
                  str(tmp_path / "full" / "checkpoint-00000002.pt"))
    losses = [[r[k] for k in ("loss", "loss_u", "loss_v")]
              for r in read_metrics(full["metrics"])]
    assert [[r[k] for k in ("loss", "loss_u", "loss_v")]
            for r in read_metrics(resumed["metrics"])] == losses[2:]  # bit for bit
    a, b = read_checkpoint(full["checkpoint"]), read_checkpoint(resumed["checkpoint"])
    assert a["optimizer"]["param_groups"][0]["muon"]  # the recipe's Muon, its state resumed
    for key in ("model", "model_ema1", "model_ema2", "model_ema3"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


STAND_IN = """
import torch


class Features(torch.nn.Module):
    \"\"\"A stand-in for LPIPS and ConvNeXt: distances of one random convolution's features.\"\"\"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x_hat, x):
        distance = (self.conv(x_hat) - self.conv(x)).square().flatten(1).mean(1)
        return distance, 2 * distance


def make():
    torch.manual_seed(7)
    return Features()
"""


def test_perceptual_terms_from_the_command_line(tmp_path):
    """--perceptual FILE.py:FACTORY plugs the user's feature networks into the objective: the
    terms are logged and change the loss; the feature network stays out of the optimizer, the
    EMAs and the checkpoint; JiT and a weight without --perceptual are refused."""
    (tmp_path / "features.py").write_text(STAND_IN)
    spec = f"{tmp_path / 'features.py'}:make"
    plain = run(tmp_path, "plain", "--steps", "2")
    terms = run(tmp_path, "terms", "--steps", "2", "--perceptual", spec, "--lpips-lambda", "0.5",
                "--perceptual-max-t", "1.0")
    rows = read_metrics(terms["metrics"])
    assert all(r["aux_loss_lpips"] > 0 for r in rows)
    for r in rows:  # the stand-in's ConvNeXt term is twice its LPIPS term, example by example
        assert r["aux_loss_convnext"] == pytest.approx(2 * r["aux_loss_lpips"], rel=1e-5)
    assert "aux_loss_lpips" not in read_metrics(plain["metrics"])[0]
    assert rows[0]["loss"] > read_metrics(plain["metrics"])[0]["loss"]  # the terms add
    assert rows[0]["loss_u"] == read_metrics(plain["metrics"])[0]["loss_u"]  # same first step
    ckpt = read_checkpoint(terms["checkpoint"])
    assert set(ckpt["model"]) == set(read_checkpoint(plain["checkpoint"])["model"])
    assert ckpt["args"]["perceptual"] == spec and ckpt["args"]["lpips_lambda"] == 0.5
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "pMF-T/4", "--convnext-lambda", "0.2"])
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "JiT-T/4", "--perceptual", spec])
    with pytest.raises(train.TrainingError, match="has no function 'missing'"):
        run(tmp_path, "bad", "--steps", "1", "--perceptual", f"{tmp_path / 'features.py'}:missing")


def test_data_proportion_reaches_the_objective():
    """--data-proportion sets the share of flow-matching examples (r = t) of each batch."""
    from jitfast.training.build import build
    args = train.parse_args(TINY + ["--data-proportion", "0.25"])
    objective, _ = build(args, 10, torch.device("cpu"), world=1)
    assert objective.flow_matching_examples(8) == 2
    assert objective.draw(8, 0, 0, shape=(3, 16, 16)).fm.tolist() == [True] * 2 + [False] * 6


def test_activation_checkpointing_recomputes_every_block_and_changes_nothing(tmp_path,
                                                                              monkeypatch):
    """--activation-checkpointing on pMF: each block (the v-head's included) runs its JVP pass
    (forward_dual) or forward again in the backward, and the run's losses and weights are those
    of the run without it."""
    from jitfast.network.pmf import PMFBlock
    from jitfast.training.build import build
    calls = []
    for name in ("forward", "forward_dual"):
        def counted(block, *a, method=getattr(PMFBlock, name), **k):
            if torch.is_grad_enabled():  # not the guidance pass's
                calls.append(block)
            return method(block, *a, **k)
        monkeypatch.setattr(PMFBlock, name, counted)
    args = train.parse_args(TINY + ["--activation-checkpointing"])
    objective, _ = build(args, 10, torch.device("cpu"), world=1)
    draws = objective.draw(4, 0, 0, shape=(3, 16, 16))
    loss = objective(torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4), *draws)[0]
    assert sorted(map(id, calls)) == sorted(map(id, objective.net.sharding_units))
    loss.backward()
    assert sorted(map(id, calls)) == sorted(2 * list(map(id, objective.net.sharding_units)))
    monkeypatch.undo()

    plain = run(tmp_path, "plain", "--steps", "2")
    recomputed = run(tmp_path, "recomputed", "--steps", "2", "--activation-checkpointing")
    keys = ("loss", "loss_u", "loss_v")
    assert [[r[k] for k in keys] for r in read_metrics(recomputed["metrics"])] == \
        [[r[k] for k in keys] for r in read_metrics(plain["metrics"])]
    a, b = read_checkpoint(plain["checkpoint"]), read_checkpoint(recomputed["checkpoint"])
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-6, atol=1e-7)


def test_init_from_a_pmf_checkpoint(tmp_path, capsys):
    """`--init-from` for pMF: a pMF-T/4 at 16 px becomes a pMF-T/8 at 32 px, both heads
    transferred (at lr 0 the child's weights stay the transferred parent's), the noise scale
    doubled; a file without the v-head and another family's preset are refused."""
    parent = run(tmp_path, "parent", "--steps", "2")
    capsys.readouterr()
    child = run(tmp_path, "child", "--init-from", parent["checkpoint"], "--model", "pMF-T/8",
                "--image-size", "32", "--steps", "1", "--lr", "0")
    assert (f"init from {parent['checkpoint']} (ema1, step 2): 16 px patch 4 -> 32 px patch 8 "
            f"(factor 2); noise scale 2 (the parent's 1 x 2; --noise-scale overrides)"
            in capsys.readouterr().err)
    ckpt = read_checkpoint(child["checkpoint"])
    assert ckpt["args"]["noise_scale"] == 2.0 and child["denoiser"].noise_scale == 2.0
    assert ckpt["args"]["parent"]["path"] == parent["checkpoint"]
    start = transfer(load_checkpoint(parent["checkpoint"], v_head=True), 32, 8).state_dict()
    assert any(k.startswith("v_final_layer.") for k in start)
    assert set(ckpt["model"]) == {f"net.{k}" for k in start}
    for name, value in start.items():
        assert torch.equal(ckpt["model"][f"net.{name}"], value), name
    sampling_file = tmp_path / "sampling.pt"  # the u-head's network alone, as published
    torch.save(load_checkpoint(parent["checkpoint"]).state_dict(), sampling_file)
    with pytest.raises(TransferError, match="cannot start a pMF-T/8 run: .*no v-head"):
        run(tmp_path, "bare", "--init-from", str(sampling_file), "--init-weights", "model",
            "--model", "pMF-T/8", "--image-size", "32", "--steps", "1")
    with pytest.raises(TransferError, match="cannot start a JiT-T/8 run: the file holds .*pMF"):
        run(tmp_path, "jit", "--init-from", parent["checkpoint"], "--model", "JiT-T/8",
            "--image-size", "32", "--steps", "1")


def test_a_compiled_pmf_run_trains_as_the_eager_one(tmp_path):
    """`--compile` (the one-step quick start's): torch.compile of the objective, its JVP pass
    included, gives the eager run's losses and weights to rounding."""
    keys = ("loss", "loss_u", "loss_v")
    eager = run(tmp_path, "eager", "--steps", "2")
    compiled = run(tmp_path, "compiled", "--steps", "2", "--compile")
    want = [r[k] for r in read_metrics(eager["metrics"]) for k in keys]
    got = [r[k] for r in read_metrics(compiled["metrics"]) for k in keys]
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-4)
    a, b = read_checkpoint(eager["checkpoint"]), read_checkpoint(compiled["checkpoint"])
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-3, atol=1e-5)


def test_bf16_precision_on_the_cpu_trains_near_the_float32_run(tmp_path, capsys, monkeypatch):
    """`--precision bf16` (the one-step quick start's): the step under bf16 autocast and Muon's
    Newton-Schulz in bf16, its losses near the float32 run's but not equal (the runs are
    deterministic: auto on the CPU is that float32 run, bit for bit). The first step's are
    equal: the heads start at zero. The log says which, and where a CPU has no bf16 dot
    products, that bf16 is slower there."""
    import jitfast.training.run
    monkeypatch.setattr(jitfast.training.run, "native_bf16", lambda: False)
    keys = ("loss", "loss_u", "loss_v")
    losses = {}
    for precision in ("auto", "fp32", "bf16"):
        result = run(tmp_path, precision, "--steps", "2", "--precision", precision)
        losses[precision] = [r[k] for r in read_metrics(result["metrics"]) for k in keys]
        log = capsys.readouterr().err
        assert (", bf16, steps" in log) == (precision == "bf16") != (", float32, steps" in log)
        assert ("emulated there, slower" in log) == (precision == "bf16")
    assert losses["auto"] == losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)
    assert losses["bf16"][:3] == losses["fp32"][:3] and losses["bf16"][3:] != losses["fp32"][3:]
