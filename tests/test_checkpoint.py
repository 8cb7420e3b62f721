"""Checkpoints: official layout (with/without ``net.``), EMA selection, round trip, bad files."""
import argparse
import os
from pathlib import Path

import pytest
import torch

from jitfast import (EMA, CheckpointError, Denoiser, JiT, JiT_models, load_checkpoint,
                     save_checkpoint)
from jitfast.io.checkpoint import atomic_save

OFFICIAL = torch.load(Path(__file__).parent / "fixtures" / "official_tiny.pt", weights_only=True)


def tiny_t4(seed):
    torch.manual_seed(seed)
    net = JiT_models["JiT-T/4"](input_size=16, num_classes=5, backend="torch")
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return net


def prefixed(state):
    return {f"net.{k}": v for k, v in state.items()}


def official_file(path, args=None):
    """An official-layout file: three different weight sets with the ``net.`` prefix."""
    sets = {name: prefixed(tiny_t4(seed).state_dict())
            for seed, name in enumerate(("model", "model_ema1", "model_ema2"))}
    ckpt = {**sets, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7,
            "args": args if args is not None else argparse.Namespace(model="JiT-T/4", cfg=2.9)}
    torch.save(ckpt, path)
    return sets


def outputs(net):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.2, 0.9])
    return net.eval()(x, t, torch.tensor([1, 5]))


@pytest.mark.parametrize("weights", ["model", "ema1", "ema2"])
def test_official_layout_selects_weights(tmp_path, weights):
    sets = official_file(tmp_path / "checkpoint-last.pth")
    net = load_checkpoint(tmp_path / "checkpoint-last.pth", weights=weights, backend="torch")
    key = {"model": "model", "ema1": "model_ema1", "ema2": "model_ema2"}[weights]
    reference = JiT_models["JiT-T/4"](input_size=16, num_classes=5, backend="torch")
    reference.load_state_dict({k[4:]: v for k, v in sets[key].items()})
    assert not net.training
    assert torch.equal(outputs(net), outputs(reference))
    assert net.in_context_start == 2 and net.num_classes == 5


def test_preset_inferred_from_shapes_without_args(tmp_path):
    official_file(tmp_path / "c.pth", args={})
    net = load_checkpoint(tmp_path / "c.pth")
    assert (net.hidden_size, len(net.blocks), net.in_context_start) == (192, 6, 2)


def test_official_tiny_needs_in_context_start_then_matches_official(tmp_path):
    torch.save({"model": prefixed(OFFICIAL["state_dict"])}, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="in_context_start"):
        load_checkpoint(tmp_path / "tiny.pth", weights="model")
    net = load_checkpoint(tmp_path / "tiny.pth", weights="model", in_context_start=2)
    f = OFFICIAL["forward"]
    out = net(f["x"], f["t"], f["y"])
    assert ((out - f["expected"]).norm() / f["expected"].norm()).item() < 1e-5


def test_bare_state_dict_with_and_without_prefix(tmp_path):
    net = tiny_t4(3)
    for name, state in (("plain.pt", net.state_dict()), ("net.pt", prefixed(net.state_dict()))):
        torch.save(state, tmp_path / name)
        for weights in ("model", None):  # a file of one weight set loads with the defaults
            loaded = load_checkpoint(tmp_path / name, weights=weights)
            assert torch.equal(outputs(loaded), outputs(net))
    with pytest.raises(CheckpointError, match="bare state dict with no EMA"):
        load_checkpoint(tmp_path / "plain.pt", weights="ema1")


def test_save_load_round_trip_with_ema(tmp_path):
    net = JiT(input_size=16, patch_size=4, hidden_size=40, depth=3, num_heads=2, mlp_ratio=3.0,
              num_classes=5, bottleneck_dim=8, in_context_len=3, in_context_start=1)
    denoiser = Denoiser(net)
    ema = EMA(denoiser, decays=(0.5, 0.25))
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.update()
    optimizer = torch.optim.AdamW(denoiser.parameters())
    save_checkpoint(tmp_path / "ck.pth", denoiser, ema, optimizer, epoch=3, step=11)
    raw = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "config"} <= set(raw)
    assert all(k.startswith("net.") for k in raw["model_ema1"]) and raw["step"] == 11
    for weights, expected_state in (("model", denoiser.state_dict()),
                                    ("ema1", ema.state_dict(1)), ("ema2", ema.state_dict(2))):
        loaded = load_checkpoint(tmp_path / "ck.pth", weights=weights)
        assert loaded.config == net.config  # custom config (mlp_ratio 3, in-context 3 from 1)
        reference = JiT(**net.config)
        reference.load_state_dict({k[4:]: v for k, v in expected_state.items()})
        assert torch.equal(outputs(loaded), outputs(reference)), weights


def test_missing_ema_entry_lists_what_is_there(tmp_path):
    torch.save({"model": prefixed(tiny_t4(0).state_dict()), "epoch": 1}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"no 'model_ema2'.*\['model'\]"):
        load_checkpoint(tmp_path / "c.pth", weights="ema2")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = tiny_t4(0).state_dict()
    del state["blocks.3.norm2.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.3\.norm2\.weight.*"
                                              r"unexpected keys: blocks\.0\.extra\.weight"):
        load_checkpoint(tmp_path / "c.pth", weights="model")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = tiny_t4(0).state_dict()
    state["blocks.1.attn.proj.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.bias: checkpoint \(7,\) "
                                              r"vs model \(192,\)"):
        load_checkpoint(tmp_path / "c.pth", weights="model")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"model": Payload()}, p), r"arbitrary unpickling.*posix\.system"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("step,loss\n1,0.5\n"), "not a PyTorch checkpoint"),
    (lambda p: torch.save(torch.zeros(3), p), "not a JiT checkpoint"),
    (lambda p: torch.save({"model": {"foo": torch.zeros(1)}}, p), "key 'pos_embed' is missing"),
])
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, weights="model")


def test_truncated_file(tmp_path):
    official_file(tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pth")


def test_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    official_file(tmp_path / "c.pth")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_checkpoint(tmp_path / "c.pth", weights="ema4")
    with pytest.raises(CheckpointError, match="no 'model_ema3' entry"):  # a pMF run's third
        load_checkpoint(tmp_path / "c.pth", weights="ema3")


def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(2)}, path)

    def crash(obj, f):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pth"]
