"""pixel MeanFlow against the official PyTorch port's outputs (tests/fixtures/pmf_official_tiny.pt,
made by make_pmf_fixture.py beside it): the network's u and 1-, 2- and 3-step generate, on both
op backends (the Triton kernels interpreted on the CPU); the published key lists of every preset;
loading, detection and the refusals of bad files and settings."""
import json
from pathlib import Path

import pytest
import torch

from jitfast import JiT, PMF, PMFSampler, PMF_models, load_checkpoint
from jitfast.io.checkpoint import CheckpointError, read_checkpoint
from jitfast.io.pmf_weights import pmf_config_from_state, pmf_from_official, pmf_model_from_state
from jitfast.network.pmf_presets import PMF_SAMPLING, pmf_preset_config, pmf_preset_of

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "pmf_official_tiny.pt", weights_only=True)
KEYS = json.loads((FIXTURES / "pmf_official_keys.json").read_text())


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def official_net(backend="torch"):
    return pmf_model_from_state(OFFICIAL["state_dict"], backend=backend)


def test_fixture_weights_are_away_from_their_zero_init():
    state = OFFICIAL["state_dict"]
    for key in ("net.shared_blocks.0.attn_scale", "net.u_heads.1.mlp_scale",
                "net.u_final_layer.linear._flax_linear.weight"):
        assert state[key].abs().min() > 0, key


def test_network_u_matches_official(backend):
    f = OFFICIAL["forward"]
    net = official_net(backend)
    u = net(f["z"], f["t"], f["h"], f["omega"], f["t_min"], f["t_max"], f["y"])
    assert u.shape == f["expected"].shape
    assert rel_err(u, f["expected"]) < 1e-5


@pytest.mark.parametrize("run", OFFICIAL["generate"], ids=lambda r: f"{r['steps']}-step")
def test_generate_matches_official(backend, run):
    sampler = PMFSampler(official_net(backend), noise_scale=run["noise_scale"])
    images = sampler.generate(run["labels"], run["steps"], run["omega"],
                              (run["t_min"], run["t_max"]), z0=run["z0"])
    assert images.dtype == torch.float32
    assert rel_err(images, run["expected"]) < 1e-5


def test_one_step_is_the_x_prediction():
    """At t = 1, r = 0: z - 1·(z - x̂)/1 = x̂, the head's output (a real check of the update's
    sign and time convention, independent of the fixture)."""
    net = official_net()
    run = OFFICIAL["generate"][0]
    z = run["noise_scale"] * run["z0"]
    ones = torch.ones(len(z))
    guidance = (torch.full_like(ones, run["omega"]), torch.full_like(ones, run["t_min"]),
                torch.full_like(ones, run["t_max"]))
    x_hat = net(z, ones, ones, *guidance, run["labels"], head=lambda u, w, b: torch.nn.functional
                .linear(u, w, b))
    from jitfast.functional.ops import unpatchify
    x_hat = unpatchify(x_hat, net.patch_size, 3)
    images = PMFSampler(net, noise_scale=run["noise_scale"]).generate(
        run["labels"], 1, run["omega"], (run["t_min"], run["t_max"]), z0=run["z0"])
    assert rel_err(images, x_hat) < 1e-5


@pytest.mark.parametrize("official_name", sorted(KEYS))
def test_published_layout_of_every_preset_loads(official_name):
    """The official key list (v-head included) of each preset converts to exactly our preset's
    keys and shapes, and its shapes alone name the preset."""
    entry = KEYS[official_name]
    arch, patch = official_name.split("_")[1:]
    name = f"pMF-{arch}/{patch}"
    dtypes = {"float32": torch.float32, "complex64": torch.complex64}
    state = {k: torch.empty(shape, dtype=dtypes[dtype], device="meta")
             for k, (shape, dtype) in entry["keys"].items()}
    converted = pmf_from_official(state)
    config = pmf_config_from_state(converted)
    assert pmf_preset_of(config) == name
    published = entry["keys"]
    assert config == {**pmf_preset_config(name), "in_channels": 3, "num_classes": 1000,
                      "mlp_hidden": published["net.u_heads.0.mlp.w1._flax_linear.weight"][0][0],
                      "bottleneck_dim": published["net.x_embedder.proj1.weight"][0][0],
                      "v_head": False}
    for v_head in (False, True):  # the published list holds the v-head: kept on request
        converted = pmf_from_official(state, v_head=v_head)
        with torch.device("meta"):
            ours = PMF_models[name](num_classes=1000, v_head=v_head)
        expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected
        assert sum(v.numel() for v in converted.values()) == \
            sum(p.numel() for p in ours.parameters())
        assert pmf_config_from_state(converted)["v_head"] == v_head


def test_official_mlp_width_rule():
    """SwiGLU widths from the published key lists: int(D·8/3), rounded to 8 above 1024."""
    widths = {name: entry["keys"]["net.u_heads.0.mlp.w1._flax_linear.weight"][0][0]
              for name, entry in KEYS.items()}
    assert widths == {"pmfDiT_B_16": 2048, "pmfDiT_B_32": 2048, "pmfDiT_L_16": 2730,
                      "pmfDiT_L_32": 2730, "pmfDiT_H_16": 3416, "pmfDiT_H_32": 3416}
    for name in PMF_SAMPLING:
        with torch.device("meta"):
            net = PMF_models[name]()
        arch = name[4]
        assert net.u_heads[0].mlp.w2.weight.shape[1] == widths[f"pmfDiT_{arch}_16"]


def test_bare_official_file_loads_with_the_defaults(tmp_path):
    """A published-style file (a bare pixelMeanFlow state dict, v-head and complex RoPE table
    included) loads with load_checkpoint's defaults, safely (weights_only), as a PMF."""
    path = tmp_path / "pMF-tiny.pt"
    torch.save(OFFICIAL["state_dict"], path)
    net = load_checkpoint(path)
    assert isinstance(net, PMF) and not net.training
    f = OFFICIAL["forward"]
    u = net(f["z"], f["t"], f["h"], f["omega"], f["t_min"], f["t_max"], f["y"])
    assert rel_err(u, f["expected"]) < 1e-5
    with pytest.raises(CheckpointError, match=r"holds a pMF network .*not a JiT network"):
        load_checkpoint(path, family="JiT")


def test_save_pretrained_round_trip_and_family_checks(tmp_path):
    net = official_net()
    net.save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["_class_name"] == "PMF"
    again = PMF.from_pretrained(tmp_path / "folder")
    f = OFFICIAL["forward"]
    args = (f["z"], f["t"], f["h"], f["omega"], f["t_min"], f["t_max"], f["y"])
    assert torch.equal(again(*args), net(*args))
    assert rel_err(again(*args), f["expected"]) < 1e-5  # the official port's u
    with pytest.raises(CheckpointError, match="not a JiT network"):
        JiT.from_pretrained(tmp_path / "folder")
    jit = JiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2,
              bottleneck_dim=8, num_classes=3, in_context_len=0)
    jit.save_pretrained(tmp_path / "jit")
    with pytest.raises(CheckpointError, match="holds a JiT network, not a pMF network"):
        PMF.from_pretrained(tmp_path / "jit")


def test_mismatched_and_incomplete_files_are_refused(tmp_path):
    state = dict(OFFICIAL["state_dict"])
    del state["net.u_heads.1.attn.k_proj._flax_linear.weight"]
    torch.save(state, tmp_path / "no_k.pt")
    with pytest.raises(CheckpointError, match=r"lack net\.u_heads\.1\.attn\.k_proj|"
                                              r"lack u_heads\.1\.attn\.k_proj"):
        load_checkpoint(tmp_path / "no_k.pt")
    state = dict(OFFICIAL["state_dict"])
    state["net.shared_blocks.0.norm1.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "bad_shape.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches: shared_blocks\.0\.norm1"):
        load_checkpoint(tmp_path / "bad_shape.pt")
    torch.save({"net.u_final_layer.norm.weight": torch.ones(4)}, tmp_path / "stub.pt")
    with pytest.raises(CheckpointError, match="not a pMF model|lack"):
        load_checkpoint(tmp_path / "stub.pt")
    assert read_checkpoint(tmp_path / "bad_shape.pt")  # readable: refused by the model check


def test_bad_settings_are_refused():
    net = official_net()
    sampler = PMFSampler(net)
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="omega .* must be >= 1"):
        sampler.generate(y, omega=0.5)
    with pytest.raises(ValueError, match="interval must satisfy"):
        sampler.generate(y, interval=(0.7, 0.2))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sampler.generate(y, steps=0)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        sampler.generate(torch.tensor([11]))
    with pytest.raises(ValueError, match="z0 must have shape"):
        sampler.generate(y, z0=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        sampler.generate(y, cuda_graphs=True)
    f = OFFICIAL["forward"]
    with pytest.raises(ValueError, match=r"h must be a floating-point tensor of shape \(3,\)"):
        net(f["z"], f["t"], f["h"][:2], f["omega"], f["t_min"], f["t_max"], f["y"])
    with pytest.raises(ValueError, match=r"z must be a \(B, 3, 32, 32\)"):
        net(f["z"][:, :, :16], f["t"], f["h"], f["omega"], f["t_min"], f["t_max"], f["y"])


def test_preset_sampling_defaults_are_the_official_readme_settings():
    with torch.device("meta"):
        sampler = PMFSampler(PMF_models["pMF-L/16"]())
    assert (sampler.noise_scale, sampler.omega, sampler.interval) == (1.0, 7.0, (0.2, 0.7))
    tiny = PMFSampler(official_net())  # no preset: no guidance, noise scale 1
    assert (tiny.preset, tiny.noise_scale, tiny.omega, tiny.interval) == (None, 1.0, 1.0,
                                                                           (0.0, 1.0))


def test_convert_a_published_file_to_a_folder_and_refuse_other_layouts(tmp_path):
    from jitfast.convert import main as convert_main
    path = tmp_path / "pMF-tiny.pt"
    torch.save(OFFICIAL["state_dict"], path)
    convert_main([str(path), str(tmp_path / "folder"), "--layout", "jitfast"])
    net = PMF.from_pretrained(tmp_path / "folder")
    f = OFFICIAL["forward"]
    u = net(f["z"], f["t"], f["h"], f["omega"], f["t_min"], f["t_max"], f["y"])
    assert rel_err(u, f["expected"]) < 1e-5
    with pytest.raises(SystemExit, match="holds a pMF network .*which has no 'diffusers' layout"):
        convert_main([str(path), str(tmp_path / "d"), "--layout", "diffusers"])
    with pytest.raises(SystemExit, match="give a DST ending in .pt"):
        convert_main([str(path), str(tmp_path / "o"), "--layout", "official"])


def test_published_layout_round_trips_bit_for_bit(tmp_path):
    """The official port's state dict (the v-head and the complex RoPE buffer included) ->
    jitfast's PMF -> python -m jitfast.convert --layout official: the same keys and tensors."""
    from jitfast.convert import main as convert_main
    torch.save(OFFICIAL["state_dict"], tmp_path / "official.pt")
    convert_main([str(tmp_path / "official.pt"), str(tmp_path / "again.pt"), "--layout",
                  "official"])
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(again) == set(OFFICIAL["state_dict"])
    assert any(k.startswith("net.v_heads.") for k in again)
    for key, value in OFFICIAL["state_dict"].items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


def test_bfloat16_network_samples_close_to_float32():
    """A bf16 network (how python -m jitfast.sample runs one on CUDA) takes the float32 state:
    the patch embedding casts it, the update stays float32."""
    run = OFFICIAL["generate"][1]
    args = (run["labels"], run["steps"], run["omega"], (run["t_min"], run["t_max"]))
    want = PMFSampler(official_net(), run["noise_scale"]).generate(*args, z0=run["z0"])
    got = PMFSampler(official_net().to(torch.bfloat16), run["noise_scale"]).generate(
        *args, z0=run["z0"])
    assert got.dtype == torch.float32 and rel_err(got, want) < 2e-2
