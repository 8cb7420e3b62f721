"""pixel MeanFlow's training objective (jitfast.PMFObjective) against the official JAX code:
the loss parts and every parameter's gradient within 1e-4 on both backends, from its outputs in
tests/fixtures/pmf_objective_official.pt (how it was made: tests/fixtures/README.md) and, where
the official code and JAX are at hand (benchmarks/official_pmf_jax.sh; pip install
jax==0.4.34 jaxlib==0.4.34 flax==0.10.4), from a run of it; the network's JVP against
torch.func.jvp; the draws' distributions and determinism; the v-head's loading; the passes."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from jitfast import PMF, PMFDraws, PMFObjective, load_checkpoint
from jitfast.io.checkpoint import CheckpointError
from jitfast.io.pmf_weights import pmf_from_official, pmf_model_from_state

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "pmf_objective_official.pt", weights_only=True)
KEYS = __import__("json").loads((FIXTURES / "pmf_official_keys.json").read_text())
OFFICIAL_CODE = Path(__file__).parent.parent / ".official-pmf-jax"
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the fused kernels need Triton"))
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fixture_draws(found=OFFICIAL):
    d = found["draws"]
    return PMFDraws(d["t"], d["r"], d["fm"], d["noise"], d["omega"], d["t_min"], d["t_max"],
                    d["drop"])


def our_loss(backend, found=OFFICIAL):
    """(parts, {name: grad in the published layout's fused form}) of jitfast's objective on
    the official run's weights, images, labels and draws."""
    net = pmf_model_from_state(found["state_dict"], backend=backend, v_head=True).train()
    net.check_values = False
    objective = PMFObjective(net, **found["defaults"])
    loss, parts = objective.loss(found["images"], found["labels"], fixture_draws(found))
    loss.backward()
    return parts, {name: p.grad for name, p in net.named_parameters() if p.requires_grad}


def assert_matches(parts, grads, found):
    for name, value in found["parts"].items():
        assert float(parts[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    want = pmf_from_official(found["grads"], v_head=True)  # q/k/v and w1/w3 fused as ours
    assert set(grads) == set(want)
    errors = {name: rel_err(grads[name], want[name]) for name in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_loss_and_gradients_match_the_official_jax_code(backend):
    """Official loss 2.0 (each adaptively weighted term ≈ 1), loss_u 82.7, loss_v 73.6: the
    parts, and the gradient of each of the 98 official parameters, within 1e-4."""
    parts, grads = our_loss(backend)
    assert_matches(parts, grads, OFFICIAL)


def test_fixture_is_in_the_published_layout_and_away_from_zero():
    """The fixture's keys are those of the published files (block indices aside), and no
    zero-initialised parameter is left at zero (so none hides a term)."""
    published = {re.sub(r"\.\d+\.", ".N.", k) for k in KEYS["pmfDiT_B_16"]["keys"]}
    ours = {re.sub(r"\.\d+\.", ".N.", k) for k in OFFICIAL["state_dict"]}
    assert ours == published - {"net.rope_freqs"}
    assert all(v.abs().max() > 0 for v in OFFICIAL["state_dict"].values())
    assert OFFICIAL["draws"]["drop"].sum() == 2 and OFFICIAL["draws"]["fm"].sum() == 3


@pytest.mark.skipif(not (OFFICIAL_CODE / "pmf.py").is_file()
                    or importlib.util.find_spec("jax") is None
                    or importlib.util.find_spec("flax") is None,
                    reason="the official pMF JAX code is not in .official-pmf-jax/ "
                           "(benchmarks/official_pmf_jax.sh) or jax/flax are not installed "
                           "(pip install jax==0.4.34 jaxlib==0.4.34 flax==0.10.4)")
def test_a_run_of_the_official_code_matches_now():
    """The official code run here gives the fixture's numbers, and jitfast matches that run."""
    sys.path.insert(0, str(FIXTURES))
    from make_pmf_objective_fixture import run
    state, grads, parts, draws = run(OFFICIAL_CODE)
    found = {**OFFICIAL, "parts": parts,
             "state_dict": {k: torch.from_numpy(v.copy()) for k, v in state.items()},
             "grads": {k: torch.from_numpy(v.copy()) for k, v in grads.items()}}
    for name, value in parts.items():
        assert value == pytest.approx(OFFICIAL["parts"][name], rel=1e-6, abs=1e-7)
    assert_matches(*our_loss("torch", found), found)


def tiny_pmf(backend):
    torch.manual_seed(0)
    net = PMF(input_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2, head_depth=2,
              num_classes=5, bottleneck_dim=8, v_head=True, backend=backend)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.check_values = False
    return net


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_network_jvp_matches_torch_func_jvp(backend):
    """(u, du, v) of forward_dual against torch.func.jvp of the plain network's u along
    (ż, ṫ, ḣ) (math attention), and v against the network's v: 1e-5 in float32."""
    net = tiny_pmf(backend)
    reference = tiny_pmf("torch")
    B = 3
    g = torch.Generator().manual_seed(1)
    z, tz = torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 16, 16, generator=g)
    t = torch.tensor([0.9, 0.3, 0.02])
    h = torch.tensor([0.5, 0.3, 0.01])
    omega, t_min, t_max = torch.tensor([3.0, 1.0, 6.0]), torch.zeros(B), torch.ones(B)
    y = torch.tensor([1, 5, 2])
    tt, th = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([1.0, 0.7, -1.0])

    def u_of(z, t, h):
        return reference.velocities(z, t, h, omega, t_min, t_max, y)[0]
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        want_u, want_du = jvp(u_of, (z, t, h), (tz, tt, th))
        want_v = reference.velocities(z, t, h, omega, t_min, t_max, y, u=False)
    u, du, v = net.forward_dual(z, t, h, omega, t_min, t_max, y, tz, tt, th)
    assert rel_err(u, want_u) < 1e-5 and rel_err(v, want_v) < 1e-5
    assert rel_err(du, want_du) < 1e-5, rel_err(du, want_du)
    assert not du.requires_grad and u.requires_grad


def test_draws_follow_the_official_samplers_and_repeat():
    """t ≥ r with r = t on the first int(B·0.5) examples; t_min, t_max in [0, 0.5] and
    [0.5, 1] (0 and 1 there); ω in [1, 1 + cfg_max]; the first num_drop labels dropped; the same
    numbers for the same (seed, step), whatever slice of the batch a process draws."""
    objective = PMFObjective(tiny_pmf("torch"))
    B = 64
    d = objective.draw(B, seed=3, step=7)
    assert bool((d.t >= d.r).all()) and torch.equal(d.fm, torch.arange(B) < 32)
    assert torch.equal(d.r[:32], d.t[:32]) and bool((d.r[32:] < d.t[32:]).all())
    assert bool((d.t_min[32:] <= 0.5).all() and (d.t_max[32:] >= 0.5).all())
    assert bool((d.t_min[:32] == 0).all() and (d.t_max[:32] == 1).all())
    assert bool((d.omega >= 1).all() and (d.omega <= 8).all())
    drops = int(d.drop.sum())
    assert torch.equal(d.drop, torch.arange(B) < drops)
    assert d.noise.shape == (B, 3, 16, 16)
    again = objective.draw(B, seed=3, step=7)
    halves = [objective.draw(B, seed=3, step=7, first=f, count=B // 2) for f in (0, B // 2)]
    for field in PMFDraws._fields[:-1]:
        assert torch.equal(getattr(again, field), getattr(d, field)), field
        joined = torch.cat([getattr(h, field) for h in halves])
        assert torch.equal(joined, getattr(d, field)), field
    assert [d.fm_count, *(h.fm_count for h in halves)] == [32, 32, 0]
    other = objective.draw(B, seed=3, step=8)
    assert not torch.equal(other.t, d.t)


def test_guidance_evaluates_each_velocity_once():
    """One v-head pass of 2B + (B - B/2) examples (the official step: 2B, then B again), no
    u-head for it; the JVP pass runs u-head and v-head on the B examples."""
    net = tiny_pmf("torch")
    objective = PMFObjective(net)
    calls = []
    velocities = net.velocities

    def spy(z, *args, u=True):
        calls.append((z.shape[0], u))
        return velocities(z, *args, u=u)
    net.velocities = spy
    B = 6
    d = objective.draw(B, seed=0, step=0)
    objective.loss(torch.rand(B, 3, 16, 16) * 2 - 1, torch.arange(B) % 5, d)
    assert calls == [(2 * B + B // 2, False)]
    assert objective.passes(B) == {"guidance (trunk + v-head)": 15,
                                   "JVP (trunk and u-head with tangents, v-head)": 6}


def test_a_process_share_of_the_batch_gives_its_share_of_the_loss():
    """Data parallelism: two processes drawing examples [0, 3) and [3, 6) of a batch of 6 (the
    first three flow matching: all of one share, none of the other's) reproduce one process's loss
    and gradients as the mean of theirs, through the training step's flat call."""
    torch.manual_seed(0)
    net = tiny_pmf("torch")
    for p in net.parameters():  # the zero-initialised gates and heads away from zero, and
        torch.nn.init.normal_(p, std=0.5)  # the guidance scale's embedding felt
    objective = PMFObjective(net, class_dropout_prob=0.5)
    B = 6
    images, labels = torch.rand(B, 3, 16, 16) * 2 - 1, torch.arange(B) % 5

    def loss_and_grads(first, count):
        d = objective.draw(B, seed=3, step=0, first=first, count=count)
        part = slice(first, first + count)
        loss, extras = objective(images[part], labels[part], *d)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return loss, extras, grads, d
    whole, whole_extras, whole_grads, d = loss_and_grads(0, B)
    a, a_extras, a_grads, da = loss_and_grads(0, 3)
    b, b_extras, b_grads, db = loss_and_grads(3, 3)
    assert (d.fm_count, da.fm_count, db.fm_count) == (3, 3, 0)
    assert d.drop.any() and not d.drop.all()  # both kinds of labels in the batch
    # the second share's first example is guided outside its interval (w = 1, not ω): taken
    # for a flow-matching one (r = t, w = ω), it would get another target
    assert not (d.t_min[3] <= d.t[3] <= d.t_max[3]) and not d.drop[3]
    torch.testing.assert_close((a + b) / 2, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close((a_extras + b_extras) / 2, whole_extras, rtol=1e-5, atol=0)
    for ga, gb, g in zip(a_grads, b_grads, whole_grads):
        torch.testing.assert_close((ga + gb) / 2, g, rtol=1e-4, atol=1e-7)


def test_perceptual_terms_reach_the_loss():
    """The user's perceptual callable sees x̂ = z - t·u and x; examples at t >= perceptual_max_t
    get no term; each term is weighted adaptively and by its lambda."""
    net = tiny_pmf("torch")
    B = 4
    d = PMFObjective(net).draw(B, seed=0, step=1)
    images, labels = torch.rand(B, 3, 16, 16) * 2 - 1, torch.arange(B)
    seen = {}

    def perceptual(pred_x, x):
        seen["pred_x"], seen["x"] = pred_x, x
        return torch.full((B,), 2.0), torch.full((B,), 3.0)
    cut = float(d.t.sort().values[1] + 1e-4)  # two examples below it
    plain, _ = PMFObjective(net).loss(images, labels, d)
    with_terms, parts = PMFObjective(net, perceptual=perceptual, lpips_lambda=0.5,
                                     convnext_lambda=0.25, perceptual_max_t=cut).loss(
        images, labels, d)
    near = (d.t < cut).float()
    expected = (near * (2 / 2.01 * 0.5 + 3 / 3.01 * 0.25)).mean()
    assert float((with_terms - plain).detach()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(seen["x"], images) and seen["pred_x"].shape == images.shape
    assert float(parts["aux_loss_lpips"]) == pytest.approx(float(2 * near.mean()))


def test_v_head_loads_from_a_published_file_on_request(tmp_path):
    """A published-layout file with the v-head: load_checkpoint(path, v_head=True) builds the
    trainable network with it, the plain load leaves it out; a file without one refuses."""
    path = tmp_path / "pmf.pt"
    torch.save(OFFICIAL["state_dict"], path)
    plain = load_checkpoint(path)
    trainable = load_checkpoint(path, v_head=True)
    assert not plain.has_v_head and trainable.has_v_head
    want = pmf_from_official(OFFICIAL["state_dict"], v_head=True)
    got = trainable.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("v_"))
    bare = {k: v for k, v in OFFICIAL["state_dict"].items()
            if not k.startswith(("net.v_heads.", "net.v_final_layer."))}
    torch.save(bare, path)
    with pytest.raises(CheckpointError, match="no v-head"):
        load_checkpoint(path, v_head=True)
    with pytest.raises(ValueError, match="no v-head"):
        PMFObjective(plain)
