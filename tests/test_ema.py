import pytest
import torch
import torch.nn as nn

from jitfast import EMA


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def test_update_follows_the_official_formula_for_both_decays():
    model = make_model()
    ema = EMA(model, decays=(0.9, 0.5))
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for decay, shadow in zip((0.9, 0.5), ema.shadows):
        for s, p0 in zip(shadow, start):
            assert torch.allclose(s, decay * p0 + (1 - decay) * (p0 + 1.0))


def test_swapped_puts_ema_in_and_restores_the_model():
    model = make_model()
    ema = EMA(model, decays=(0.9, 0.5))
    own = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for shadow in ema.shadows[1]:
            shadow.fill_(3.0)
    x = torch.randn(4, 3)
    before = model(x)
    with ema.swapped(2) as swapped:
        assert swapped is model
        assert all((p == 3.0).all() for p in model.parameters())
        assert not torch.allclose(model(x), before)
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), own))
    with pytest.raises(ValueError, match="EMA index"):
        with ema.swapped(3):
            pass


def test_state_dict_round_trip():
    model = make_model()
    ema = EMA(model)
    with torch.no_grad():
        for shadow in ema.shadows[0]:
            shadow.normal_()
    state = ema.state_dict(1)
    assert list(state) == list(model.state_dict())
    other = EMA(make_model())
    other.load_state_dict(state, 1)
    assert all(torch.equal(a, b) for a, b in zip(other.shadows[0], ema.shadows[0]))
    with pytest.raises(KeyError, match="0.bias"):
        other.load_state_dict({"0.weight": state["0.weight"]}, 1)


def test_bad_decay():
    with pytest.raises(ValueError, match="decays"):
        EMA(make_model(), decays=(1.5,))


def test_network_copy_holds_the_ema_weights_in_bf16():
    """The training grid's sampler: a new network of the same architecture with EMA set 2's
    weights in bf16; the model keeps its own weights and the EMA its own."""
    from jitfast import Denoiser, JiT
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=24, depth=2, num_heads=2,
              bottleneck_dim=8, num_classes=5, in_context_len=3, in_context_start=1)
    denoiser = Denoiser(net)
    ema = EMA(denoiser, decays=(0.9, 0.5))
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(1.0)
    ema.update()
    own = {k: v.clone() for k, v in net.state_dict().items()}
    copy = ema.network(net, which=2)
    assert type(copy) is JiT and copy.config == net.config and copy is not net
    for name, value in copy.state_dict().items():
        want = ema.state_dict(2)[f"net.{name}"]
        assert value.dtype == torch.bfloat16 and torch.equal(value, want.to(torch.bfloat16)), name
        assert torch.equal(net.state_dict()[name], own[name])
    sampler = denoiser.around(copy)
    assert (sampler.net is copy and sampler.noise_scale == denoiser.noise_scale
            and sampler.t_eps == denoiser.t_eps and sampler.pred == denoiser.pred)
