"""pMF's optimizer and EMAs against its official code: jitfast's Muon (training/muon.py) over a
PMF with the v-head, built by the pMF family's rule, takes the same three steps as
``optax.contrib.muon(lr, adam_b2=0.95)`` on the official flax tree (tests/fixtures/muon_optax.pt,
made by make_muon_fixture.py; a live run where the official code, JAX and optax are at hand), and
the EDM EMA decays are ``utils/ema_util.py``'s."""
import sys
from pathlib import Path

import pytest
import torch

from jitfast.io.pmf_weights import pmf_from_official, pmf_model_from_state
from jitfast.training.ema import EMA, edm_decay
from jitfast.training.families import FAMILIES
from jitfast.training.muon import Muon, muon_for, newton_schulz

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "muon_optax.pt", weights_only=True)
OFFICIAL_CODE = Path(__file__).parent.parent / ".official-pmf-jax"
BLOCKS = FAMILIES["pMF"].muon_blocks


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def steps_of_ours(found, blocks=BLOCKS, lr=None, ns_dtype=torch.float32):
    """{name: (after - before)} of jitfast's Muon run through the official run's gradients."""
    net = pmf_model_from_state(found["state_dict"], v_head=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = muon_for(net, found["lr"] if lr is None else lr, blocks, ns_dtype=ns_dtype)
    for grads in found["grads"]:
        ours = pmf_from_official(grads, v_head=True)
        for name, p in net.named_parameters():
            p.grad = ours[name].clone()
        optimizer.step()
    return {k: v - before[k] for k, v in net.state_dict().items() if k in ours}


def worst_error(found, **options):
    want = pmf_from_official(found["after"], v_head=True)
    start = pmf_from_official(found["state_dict"], v_head=True)
    ours = steps_of_ours(found, **options)
    assert set(ours) == set(want)
    errors = {k: rel_err(ours[k], want[k] - start[k]) for k in ours}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def test_three_steps_match_optax_muon_on_the_official_tree():
    """Every parameter's change over three steps within 1e-5 of optax's: the Dense kernels by
    Muon (q/k/v and w1/w3 each orthogonalised on its own), the rest by Nesterov Adam."""
    worst, error = worst_error(OFFICIAL)
    assert error < 1e-5, f"{worst}: {error:.2e}"


def test_newton_schulz_in_bf16_stays_within_its_rounding_of_optax():
    """A bf16 run's Newton–Schulz (what a TPU computes for optax's float32 matmuls at JAX's
    default precision): each change within bf16's rounding of the float32 optax's, and not
    float32's agreement (the iteration did run in bf16)."""
    worst, error = worst_error(OFFICIAL, ns_dtype=torch.bfloat16)
    assert 1e-3 < error < 3e-2, f"{worst}: {error:.2e}"


def test_the_fixture_tells_fused_blocks_from_whole_matrices():
    """Orthogonalising the fused q/k/v and w1/w3 whole is a different optimizer: the comparison
    above would catch it."""
    worst, error = worst_error(OFFICIAL, blocks={})
    assert ".qkv." in worst or ".w13." in worst
    assert error > 1e-2


def test_a_run_of_the_official_code_matches_now():
    pytest.importorskip("optax", reason="the live comparison runs optax (pip install optax)")
    if not (OFFICIAL_CODE / "pmf.py").exists():
        pytest.skip("the official pMF code is not here (benchmarks/official_pmf_jax.sh)")
    sys.path.insert(0, str(FIXTURES))
    from make_muon_fixture import edm_decays, run
    before, grads, after = run(OFFICIAL_CODE)
    tensors = lambda d: {k: torch.from_numpy(v.copy()) for k, v in d.items()}  # noqa: E731
    found = {"state_dict": tensors(before), "grads": [tensors(g) for g in grads],
             "after": tensors(after), "lr": OFFICIAL["lr"]}
    for key, value in tensors(after).items():
        assert torch.allclose(value, OFFICIAL["after"][key], rtol=1e-6, atol=1e-7), key
    worst, error = worst_error(found)
    assert error < 1e-5, f"{worst}: {error:.2e}"
    assert edm_decays(OFFICIAL_CODE) == OFFICIAL["edm"]


def test_muon_takes_the_dense_kernels_of_the_published_layout():
    """The matrices Muon takes are the published file's ``_flax_linear`` weights (the flax
    model's 2-D leaves), fused ones in their pieces; embeddings, convolutions, tokens, norms and
    biases go to Adam."""
    net = pmf_model_from_state(OFFICIAL["state_dict"], v_head=True)
    optimizer = muon_for(net, 1e-3, BLOCKS)
    names = {id(p): n for n, p in net.named_parameters()}
    matrices, adam = optimizer.param_groups
    pieces = sum(matrices["blocks"])
    flax_dense = [k for k in OFFICIAL["state_dict"] if k.endswith("_flax_linear.weight")]
    assert pieces == len(flax_dense)
    assert not any(names[id(p)].endswith(("embedding_table.weight", "tokens", "pos_embed"))
                   for p in matrices["params"])
    assert len(matrices["params"]) + len(adam["params"]) == len(list(net.parameters()))


def test_newton_schulz_orthogonalises_and_keeps_the_orientation():
    torch.manual_seed(0)
    for shape in ((3, 7, 19), (2, 19, 7)):
        x = newton_schulz(torch.randn(shape, dtype=torch.float64))
        assert x.shape == shape
        s = torch.linalg.svdvals(x)
        assert s.min() > 0.5 and s.max() < 1.3  # Muon's quintic: singular values near 1


def test_a_device_tensor_lr_steps_as_a_float_lr():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12)) for _ in (0, 1)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [muon_for(nets[0], 0.02, {}), muon_for(nets[1], 0.02, {})]
    for group in optimizers[1].param_groups:
        group["lr"] = torch.tensor(0.02)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in nets[0].parameters()]
        for net, optimizer in zip(nets, optimizers):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_muon_refuses_a_weight_not_of_whole_blocks():
    with pytest.raises(ValueError, match="whole row blocks"):
        Muon([(torch.nn.Parameter(torch.zeros(7, 4)), 3)], [], 1e-3)


def test_edm_decays_are_the_official_schedule():
    for step, halflife, decay in OFFICIAL["edm"]:
        assert edm_decay(step, halflife, 1024) == pytest.approx(decay, rel=2e-6, abs=1e-12)


def test_edm_ema_updates_with_each_step_decay():
    """EMA set k after the update of step s: lerp by 1 - edm_decay(s + 1, half-life k, batch)."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, halflives_kimg=(0.1, 0.4), batch=16)
    assert ema.decays is None and ema.sets == 2
    expected = [[p.detach().clone() for p in net.parameters()] for _ in range(2)]
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        ema.at_step(step)
        ema.update()
        for k, halflife in enumerate((0.1, 0.4)):
            decay = edm_decay(step + 1, halflife, 16)
            expected[k] = [decay * e + (1 - decay) * p.detach()
                           for e, p in zip(expected[k], net.parameters())]
            for got, want in zip(ema.shadows[k], expected[k]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="half-lives and the global batch"):
        EMA(net, halflives_kimg=(0.1,))
