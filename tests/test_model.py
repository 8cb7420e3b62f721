"""JiT network: parity with the official code, the official layout, presets, input checks."""
import re
from pathlib import Path

import pytest
import torch

from jitfast import JiT, JiT_models
from jitfast.network.presets import preset_config

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "official_tiny.pt", weights_only=True)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def official_tiny(**kwargs):
    net = JiT(**OFFICIAL["config"], **kwargs)
    net.load_state_dict(OFFICIAL["state_dict"])
    return net.eval()


def official_layout():
    """B/16 {key: shape} and {preset: (image size, parameter count)} from the official listing."""
    text = (FIXTURES / "official_state_dict.txt").read_text()
    shapes = {key: tuple(int(d) for d in dims.split(",") if d.strip())
              for key, dims in re.findall(r"^(\S+)\t\(([\d, ]*)\)$", text, flags=re.M)}
    counts = {name: (int(size), int(n)) for name, size, n in
              re.findall(r"^## (JiT-\S+) \((\d+)px.*: (\d+) parameters", text, flags=re.M)}
    return shapes, counts


@pytest.mark.parametrize("scores_fp32", [False, True])
def test_forward_matches_official(scores_fp32):
    f = OFFICIAL["forward"]
    out = official_tiny(backend="torch", attn_scores_fp32=scores_fp32)(f["x"], f["t"], f["y"])
    assert out.shape == f["expected"].shape
    assert rel_err(out, f["expected"]) < 1e-5


def test_b16_state_dict_layout_is_official():
    shapes, _ = official_layout()
    with torch.device("meta"):
        net = JiT_models["JiT-B/16"](input_size=256, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(shapes)
    assert ours == shapes


def test_preset_parameter_counts_are_official():
    _, counts = official_layout()
    assert set(counts) == {"JiT-B/16", "JiT-B/32", "JiT-L/16", "JiT-H/16"}
    for name, (size, expected) in counts.items():
        with torch.device("meta"):
            net = JiT_models[name](input_size=size, num_classes=1000)
        assert sum(p.numel() for p in net.parameters()) == expected, name


def test_preset_names():
    official = {f"JiT-{a}/{p}" for a in "BLH" for p in (16, 32)}
    assert official | {"JiT-G/16", "JiT-G/32"} <= set(JiT_models)
    assert preset_config("JiT-G/16")["hidden_size"] == 1664
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("JiT-B/8")


def test_official_initialisation():
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=48, depth=2, num_heads=3,
              num_classes=5, bottleneck_dim=8, in_context_len=2, in_context_start=1)
    for block in net.blocks:  # adaLN zero-initialised: every block starts as the identity
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
    assert net.final_layer.linear.weight.abs().sum() == 0
    assert net.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert 0.01 < net.y_embedder.embedding_table.weight.std() < 0.03
    assert not net.pos_embed.requires_grad
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert net(x, t, torch.tensor([0, 5])).abs().max() == 0  # zero output head


def test_all_parameters_get_gradients():
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=48, depth=3, num_heads=3,
              num_classes=5, bottleneck_dim=8, in_context_len=2, in_context_start=1)
    for p in net.parameters():  # leave the zero init so every path carries gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 5])).square().sum().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_labels_is_the_null_class():
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=3, bottleneck_dim=8, in_context_len=2, in_context_start=1)
    for p in net.parameters():  # off the zero init, so that the labels change the output
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    unconditional = net(x, t)
    assert torch.equal(unconditional, net(x, t, torch.full((2,), 3)))
    assert not torch.allclose(unconditional, net(x, t, torch.zeros(2, dtype=torch.long)))


def test_no_in_context_tokens():
    net = JiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=3, bottleneck_dim=8, in_context_len=0, in_context_start=0)
    assert "in_context_posemb" not in net.state_dict()
    assert net(torch.randn(1, 3, 16, 16), torch.rand(1)).shape == (1, 3, 16, 16)


def test_dropout_only_in_middle_half():
    net = JiT(input_size=16, patch_size=4, hidden_size=32, depth=8, num_heads=2, num_classes=3,
              bottleneck_dim=8, in_context_len=2, in_context_start=1, attn_drop=0.2,
              proj_drop=0.2)
    assert [b.attn.attn_drop for b in net.blocks] == [0, 0, .2, .2, .2, .2, 0, 0]
    assert [b.mlp.ffn_dropout.p for b in net.blocks] == [0, 0, .2, .2, .2, .2, 0, 0]


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(3, 3, 16, 16), torch.rand(3)), ValueError, r"\(B, 3, 32, 32\)"),
    ((torch.randn(3, 1, 32, 32), torch.rand(3)), ValueError, r"got \(3, 1, 32, 32\)"),
    ((torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.rand(3)), TypeError, "floating"),
    ((torch.randn(3, 3, 32, 32), torch.rand(2)), ValueError, r"t must .* shape \(3,\)"),
    ((torch.randn(3, 3, 32, 32), torch.tensor([0.1, 1.5, 0.2])), ValueError, r"\[0, 1\].*1.5"),
    ((torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 11, 2])), ValueError,
     r"\[0, 10\].*11"),
    ((torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0., 1., 2.])), ValueError,
     "integer"),
])
def test_input_checks(args, error, message):
    with pytest.raises(error, match=message):
        official_tiny(backend="torch")(*args)


def test_constructor_checks():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        JiT(input_size=30, patch_size=8)
    with pytest.raises(ValueError, match="in_context_start"):
        JiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2,
            in_context_len=4, in_context_start=2)
    with pytest.raises(ValueError, match="backend"):
        JiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2,
            in_context_start=1, backend="cuda")


def test_swiglu_width_is_padded_to_a_multiple_of_8_inside_the_matmuls():
    """The official tiny model's SwiGLU width, 170 (JiT-L/16's 2730), runs as 176: zero units in
    both halves of w12 and zero columns of w3, which the official parity tests (forward, loss,
    every gradient) then hold exact; a width that is a multiple of 8 is left as it is."""
    from jitfast.network.alignment import padded_swiglu
    net = official_tiny(backend="torch")
    mlp = net.blocks[0].mlp
    assert mlp.w3.weight.shape == (64, 170)
    w12, b12, w3 = padded_swiglu(mlp.w12.weight, mlp.w12.bias, mlp.w3.weight)
    assert (w12.shape, b12.shape, w3.shape) == ((352, 64), (352,), (64, 176))
    for padded, weight in ((w12, mlp.w12.weight), (b12, mlp.w12.bias)):
        assert torch.equal(padded[:170], weight[:170]) and torch.equal(padded[176:346], weight[170:])
        assert not padded[170:176].any() and not padded[346:].any()
    assert torch.equal(w3[:, :170], mlp.w3.weight) and not w3[:, 170:].any()
    aligned = (torch.ones(32, 8), None, torch.ones(8, 16))
    assert all(a is b for a, b in zip(padded_swiglu(*aligned), aligned))


def test_padded_once_pads_each_swiglu_once_for_forwards_without_gradients():
    """Within padded_once a forward without gradients reads the copies made on entry (their
    matrices in autocast's dtype under autocast) and gives the same output as without, in float32
    and under autocast; a forward with gradients pads its own, so that every parameter still gets
    its gradient; on exit nothing is held."""
    from jitfast.network.alignment import padded_once
    f = OFFICIAL["forward"]
    net = official_tiny(backend="torch")
    with torch.no_grad():
        want = net(f["x"], f["t"], f["y"])
    mlps = [block.mlp for block in net.blocks]
    with padded_once(net):
        assert all(mlp.held[0].shape == (352, 64) and mlp.held[2].shape == (64, 176)
                   for mlp in mlps)
        with torch.no_grad():
            assert torch.equal(net(f["x"], f["t"], f["y"]), want)
        mlps[0].held = tuple(torch.zeros_like(w) for w in mlps[0].held)  # what forwards read
        with torch.no_grad():
            assert not torch.equal(net(f["x"], f["t"], f["y"]), want)
        net(f["x"], f["t"], f["y"]).sum().backward()
        assert all(p.grad is not None and p.grad.any() for p in mlps[0].parameters())
    assert all(mlp.held is None for mlp in mlps)
    with torch.autocast("cpu", torch.bfloat16), padded_once(net):
        assert all(mlp.held[0].dtype == mlp.held[2].dtype == torch.bfloat16 for mlp in mlps)
        assert all(mlp.held[1].dtype == torch.float32 for mlp in mlps)  # the fused op's bias
        with torch.no_grad():
            held = net(f["x"], f["t"], f["y"])
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert torch.equal(held, net(f["x"], f["t"], f["y"]))


# the triton backend's MLP matmuls run in bf16 under the interpreter, whose bf16 tl.dot is wrong
# (docs/design.md §5) and may overflow: only that backend's dtypes are checked
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_residual_stream_dtypes_under_autocast_are_the_official_codes():
    """Under bf16 autocast the official code's residual stream is bf16 until the float32
    in-context tokens join it (its `x += pos_embed` keeps the conv's bf16), float32 after
    (tests/fixtures/official_tiny_autocast.pt, from the official code): jitfast's is the same on
    both backends, and (torch backend; the interpreter's bf16 matmuls are not exact) its output
    lies nearer the official autocast output than either lies to the float32 one."""
    official = torch.load(FIXTURES / "official_tiny_autocast.pt", weights_only=True)
    f = OFFICIAL["forward"]
    for backend in ("torch", "triton"):
        net = official_tiny(backend=backend)
        dtypes = []
        for module in (*net.blocks, net.final_layer):
            module.register_forward_hook(lambda m, inputs, out: dtypes.append(str(inputs[0].dtype)))
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            out = net(f["x"], f["t"], f["y"])
        assert dtypes == official["residual_dtypes"], backend
        if backend == "torch":
            assert rel_err(out, official["output"]) < 0.6 * official["float32_error"]
            assert rel_err(out, f["expected"]) < 1.1 * official["float32_error"]
