"""Every published weight layout: key lists made by the published code (fixtures), the official
outputs through each layout and container, save/from_pretrained, the converter, bad input."""
import json
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests, before any hub import

import pytest
import torch
from safetensors.torch import load_file, save_file

from jitfast import EMA, CheckpointError, Denoiser, JiT, load_checkpoint
from jitfast.convert import main as convert_main
from jitfast.io.checkpoint import read_checkpoint, save_checkpoint
from jitfast.io.configs import diffusers_config, jit_config
from jitfast.io.layouts import detect_layout, from_official
from jitfast.io.weight_files import save_training_weights

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "official_tiny.pt", weights_only=True)
PUBLISHED = json.loads((FIXTURES / "published_layouts.json").read_text())
THEIR_FORWARD = torch.load(FIXTURES / "diffusers_tiny" / "forward.pt", weights_only=True)
TINY = OFFICIAL["config"]


def shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


def rel_error(net, forward):
    with torch.no_grad():
        out = net(forward["x"], forward["t"], forward["y"])
    return ((out - forward["expected"]).norm() / forward["expected"].norm()).item()


def official_key_list():
    """(key, shape) of the official JiT-B/16 from official_state_dict.txt."""
    rows = [line.split("\t") for line in (FIXTURES / "official_state_dict.txt").read_text()
            .splitlines() if "\t" in line]
    return {k: list(eval(shape)) for k, shape in rows}


@pytest.mark.parametrize("published, layout", [("pr13098_split", "diffusers"),
                                               ("pr13098_fused", "diffusers-fused")])
def test_diffusers_layouts_match_the_pull_request_code(published, layout):
    """Keys, shapes and config.json fields as the pull request's own classes make them."""
    ours = from_official(OFFICIAL["state_dict"], layout)
    assert shapes(ours) == PUBLISHED[published]["keys"]
    assert detect_layout(list(PUBLISHED[published]["keys"])) == (layout, [])
    their_config = PUBLISHED[published]["config"]
    assert jit_config(their_config) == {**TINY, "attn_drop": 0.0, "proj_drop": 0.0}
    written = diffusers_config(JiT(**TINY).config)
    assert set(written) == set(their_config) - {"_diffusers_version"}
    assert all(written[k] == their_config[k] for k in written)


def test_hub_wrapper_layout_and_config():
    """The Hub wrapper (github Bili-Sakura/JiT-diffusers) of JiT-B/16: ``transformer.`` + the
    official keys, the official key list, and a config that names the preset."""
    wrapper = PUBLISHED["hub_wrapper_JiT-B/16"]
    assert {k[len("transformer."):]: v for k, v in wrapper["keys"].items()} == official_key_list()
    config = jit_config(wrapper["config"])
    with torch.device("meta"):
        net = JiT(**config)
    assert shapes({f"transformer.{k}": v for k, v in net.state_dict().items()}) == wrapper["keys"]
    assert config == dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128,
                          in_context_len=32, in_context_start=4, patch_size=16, input_size=256,
                          num_classes=1000, attn_drop=0.0, proj_drop=0.0)


def test_folder_written_by_the_pull_request_code_gives_its_outputs(tmp_path):
    """diffusers_tiny/ is the pull request's own save_pretrained; forward.pt its own output."""
    net = load_checkpoint(FIXTURES / "diffusers_tiny")
    assert rel_error(net, THEIR_FORWARD) < 1e-5
    pipeline = tmp_path / "pipeline"
    shutil.copytree(FIXTURES / "diffusers_tiny", pipeline / "transformer")
    (pipeline / "model_index.json").write_text("{}")
    assert rel_error(JiT.from_pretrained(pipeline), THEIR_FORWARD) < 1e-5


def test_sharded_folder(tmp_path):
    """Weights split over shards named by diffusion_pytorch_model.safetensors.index.json."""
    state = load_file(FIXTURES / "diffusers_tiny" / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "diffusers_tiny" / "config.json", tmp_path)
    assert rel_error(load_checkpoint(tmp_path), THEIR_FORWARD) < 1e-5


def official_tiny_as(layout, prefix=""):
    state = OFFICIAL["state_dict"] if layout == "official" else \
        from_official(OFFICIAL["state_dict"], layout)
    return {prefix + k: v for k, v in state.items()}


CASES = [("official", "net."), ("official", "transformer."), ("official", "module._orig_mod."),
         ("diffusers", ""), ("diffusers", "transformer."), ("diffusers-fused", "")]


@pytest.mark.parametrize("layout, prefix", CASES)
@pytest.mark.parametrize("container", ["pth", "safetensors", "folder"])
def test_each_layout_gives_the_official_outputs(tmp_path, layout, prefix, container):
    state = official_tiny_as(layout, prefix)
    if container == "pth":
        path = tmp_path / "w.pth"
        torch.save({"model": state}, path)
    elif container == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        save_file(state, path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps(PUBLISHED["pr13098_split"]["config"]))
    kw = {} if container == "folder" else {"in_context_start": 2}
    net = load_checkpoint(path, weights="model", **kw)
    assert rel_error(net, OFFICIAL["forward"]) < 1e-5


@pytest.mark.parametrize("layout", ["jitfast", "diffusers"])
def test_save_pretrained_then_from_pretrained(tmp_path, layout):
    net = load_checkpoint(FIXTURES / "diffusers_tiny")
    net.save_pretrained(tmp_path / "m", layout=layout, weights="ema1")
    written = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    expected = PUBLISHED["pr13098_split"]["keys"] if layout == "diffusers" else \
        {k: list(v.shape) for k, v in OFFICIAL["state_dict"].items()}
    assert shapes(written) == expected
    again = JiT.from_pretrained(tmp_path / "m")
    assert again.config == net.config and rel_error(again, THEIR_FORWARD) < 1e-5
    with pytest.raises(CheckpointError, match=r"holds the 'ema1' weights only.*weights='ema1'"):
        JiT.from_pretrained(tmp_path / "m", weights="ema2")


def test_training_safetensors_hold_model_and_both_emas(tmp_path):
    """The .safetensors beside a training checkpoint gives each of the three sets exactly."""
    denoiser = Denoiser(JiT(**TINY))
    ema = EMA(denoiser, decays=(0.5, 0.25))
    for _ in range(2):  # three different sets
        with torch.no_grad():
            torch._foreach_add_(list(denoiser.parameters()), 0.05)
        ema.update()
    save_checkpoint(tmp_path / "c.pt", denoiser, ema)
    states = {k: v for k, v in read_checkpoint(tmp_path / "c.pt").items() if k.startswith("model")}
    save_training_weights(tmp_path / "c.safetensors", states, denoiser.net.config)
    loaded = {}
    for weights in ("model", "ema1", "ema2"):
        from_pt = load_checkpoint(tmp_path / "c.pt", weights=weights).state_dict()
        loaded[weights] = load_checkpoint(tmp_path / "c.safetensors", weights=weights)
        assert loaded[weights].config == denoiser.net.config
        assert all(torch.equal(v, loaded[weights].state_dict()[k]) for k, v in from_pt.items())
    block = "blocks.0.mlp.w3.bias"
    values = [net.state_dict()[block] for net in loaded.values()]
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])


def test_converter_official_output_has_the_official_keys(tmp_path):
    src = tmp_path / "src.pth"
    torch.save({"model": official_tiny_as("diffusers", "transformer.")}, src)
    convert_main([str(src), str(tmp_path / "out"), "--layout", "official", "--weights", "model",
                  "--in-context-start", "2"])
    ckpt = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert {"model", "model_ema1", "model_ema2"} <= set(ckpt) and "optimizer" not in ckpt
    by_block = {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in official_key_list()}
    for entry in ("model", "model_ema1", "model_ema2"):
        keys = {k[len("net."):] for k in ckpt[entry]}
        assert all(k.startswith("net.") for k in ckpt[entry])
        assert {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in keys} == by_block
        assert all(torch.equal(ckpt[entry][f"net.{k}"], v)
                   for k, v in OFFICIAL["state_dict"].items())
    assert rel_error(load_checkpoint(tmp_path / "out" / "checkpoint-last.pth"),
                     OFFICIAL["forward"]) < 1e-5  # its config entry says in_context_start


@pytest.mark.parametrize("layout", ["diffusers", "jitfast"])
def test_converter_folders(tmp_path, layout):
    convert_main([str(FIXTURES / "diffusers_tiny"), str(tmp_path / "out"), "--layout", layout])
    keys = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    if layout == "diffusers":
        assert shapes(keys) == PUBLISHED["pr13098_split"]["keys"]
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert set(config) == set(PUBLISHED["pr13098_split"]["config"]) - {"_diffusers_version"}
    assert rel_error(load_checkpoint(tmp_path / "out"), THEIR_FORWARD) < 1e-5


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is a folder with no JiT weights: expected "
                                              r"diffusion_pytorch_model\.safetensors.*"
                                              r"\['config\.json'\]"):
        load_checkpoint(tmp_path)


def diffusers_folder(tmp_path, state=None, **config_changes):
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    save_file(state if state is not None else official_tiny_as("diffusers"),
              folder / "diffusion_pytorch_model.safetensors")
    config = {**PUBLISHED["pr13098_split"]["config"], **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change, message", [
    (dict(num_layers=5), r"depth=5 \(depth / num_layers\) but the weights say 4 \(blocks\.0 to "
                          r"blocks\.3\)"),
    (dict(hidden_size=96), r"hidden_size=96 .* but the weights say 64 \(pos_embed \(1, 16, 64\)\)"),
    (dict(num_classes=7), r"num_classes=7 .* say 10 \(y_embedder\.embedding_table\.weight "
                          r"\(11, 64\)"),
    (dict(mlp_ratio=3.0), r"mlp_ratio=3\.0 gives a SwiGLU hidden size of 128, but "
                          r"blocks\.0\.mlp\.w12\.weight \(340, 64\) gives 170"),
    (dict(norm_eps=1e-5), r"norm_eps 1e-05 is not supported"),
    (dict(model_type="JiT-Q/16"), r"model_type 'JiT-Q/16' is not a JiT preset"),
])
def test_config_that_disagrees_with_the_shapes(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(diffusers_folder(tmp_path, **change))


def test_missing_and_extra_keys_are_named(tmp_path):
    state = official_tiny_as("diffusers")
    del state["blocks.1.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match=r"lack blocks\.1\.attn\.to_k\.weight \(q, k and v "
                                              r"are needed together"):
        load_checkpoint(diffusers_folder(tmp_path, state))
    state = official_tiny_as("diffusers")
    del state["blocks.2.norm2.weight"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.norm2\.weight.*"
                                              r"unexpected keys: blocks\.0\.attn\.extra\.weight"):
        load_checkpoint(diffusers_folder(tmp_path / "b", state))


def test_layout_nobody_publishes_names_the_keys(tmp_path):
    state = {k.replace(".mlp.w12.", ".mlp.fc1."): v
             for k, v in official_tiny_as("official").items()}
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"key 'blocks\.0\.mlp\.w12\.weight' is missing.*"
                                              r"\(blocks\.0\.mlp\.fc1\.bias, blocks\.0\.mlp\."
                                              r"fc1\.weight, .* in no published JiT layout: "
                                              r"official, diffusers, diffusers-fused"):
        load_checkpoint(path, weights="model", in_context_start=2)


def test_truncated_safetensors(tmp_path):
    save_file(official_tiny_as("diffusers"), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_repo_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"'BiliSakura/JiT-diffusers' is not a local path, "
                                              r"and cannot be had from the Hugging Face Hub "
                                              r"\(HF_HUB_OFFLINE is set\).*"
                                              r"huggingface-cli download BiliSakura/JiT-diffusers "
                                              r"--include 'JiT-B-16/\*'"):
        JiT.from_pretrained("BiliSakura/JiT-diffusers", subfolder="JiT-B-16")


def test_repo_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install 'jitfast\[hub\]'"):
        JiT.from_pretrained("BiliSakura/JiT-diffusers")
