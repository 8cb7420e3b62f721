"""The flow-matching objective: official loss parity and the 9 prediction/loss combinations."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from jitfast import Denoiser, JiT
from jitfast.diffusion.denoiser import SPACES, convert

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = torch.load(FIXTURES / "official_tiny.pt", weights_only=True)
OFFICIAL_GRADS = torch.load(FIXTURES / "official_tiny_grads.pt", weights_only=True)


class Oracle(nn.Module):
    """Returns a fixed tensor whatever the input: the true target when the test knows it."""

    def __init__(self, output, num_classes=10):
        super().__init__()
        self.output, self.num_classes = output, num_classes
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((z.clone(), t.clone(), y.clone()))
        return self.output


def test_loss_matches_official(backend):
    """On the triton backend, JiT's objective is fused into the output head."""
    L = OFFICIAL["loss"]
    net = JiT(**OFFICIAL["config"], backend=backend)
    net.load_state_dict(OFFICIAL["state_dict"])
    denoiser = Denoiser(net, noise_scale=L["noise_scale"], t_eps=L["t_eps"]).eval()
    loss = denoiser.loss(L["x"], L["labels"], t=L["t"], noise=L["noise"])
    assert abs(loss.item() - L["expected"].item()) / L["expected"].item() < 1e-5


@pytest.mark.parametrize("across_blocks", [True, False])
def test_loss_gradients_match_official(backend, across_blocks):
    """Every parameter's gradient of that loss against the official code's, run in float64
    (fixtures/make_official_grads.py), within twice the official float32 run's own worst error
    (6e-6, a q/k norm weight's: a sum over every token and head): each fused op's backward, the
    biases added by the ops that consume their Linear's output, and, across blocks (off under
    FSDP2), the residual update added by the next block's norm and the adaLN vectors from one
    stacked matmul."""
    L = OFFICIAL["loss"]
    net = JiT(**OFFICIAL["config"], backend=backend)
    net.load_state_dict(OFFICIAL["state_dict"])
    net.fuse_across_blocks = across_blocks
    denoiser = Denoiser(net, noise_scale=L["noise_scale"], t_eps=L["t_eps"]).eval()
    denoiser.loss(L["x"], L["labels"], t=L["t"], noise=L["noise"]).backward()
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    truth = OFFICIAL_GRADS["grads"]
    assert grads.keys() == truth.keys()
    errors = {name: ((grads[name].double() - g).norm() / g.norm()).item()
              for name, g in truth.items()}
    bound = 2 * max(OFFICIAL_GRADS["float32_error"].values())
    assert max(errors.values()) < bound, sorted(errors.items(), key=lambda e: -e[1])[:5]


@pytest.mark.parametrize("pred", SPACES)
@pytest.mark.parametrize("loss", SPACES)
def test_oracle_gives_zero_loss(pred, loss):
    torch.manual_seed(0)
    x, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.01, 0.3, 0.7, 0.99])  # both clamped ends included
    e = 2.0 * noise
    truth = {"x": x, "e": e, "v": x - e}[pred]
    oracle = Oracle(truth)
    denoiser = Denoiser(oracle, pred=pred, loss=loss, noise_scale=2.0).eval()
    assert denoiser.loss(x, torch.zeros(4, dtype=torch.long), t=t, noise=noise).item() < 1e-10
    z, _, _ = oracle.calls[0]
    assert torch.allclose(z, t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e)
    # a wrong answer is penalised (the test can fail)
    oracle.output = truth + 0.1
    assert denoiser.loss(x, None, t=t, noise=noise).item() > 1e-4


@pytest.mark.parametrize("src", SPACES)
@pytest.mark.parametrize("dst", SPACES)
def test_conversions_are_mutual_inverses(src, dst):
    torch.manual_seed(1)
    x, e = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0.06, 0.2, 0.5, 0.8, 0.94]).view(-1, 1, 1, 1)  # no clamping
    z = t * x + (1 - t) * e
    true = {"x": x, "e": e, "v": x - e}
    assert torch.allclose(convert(true[src], src, dst, z, t, 0.05), true[dst], atol=1e-5)
    u = torch.randn_like(x)
    back = convert(convert(u, src, dst, z, t, 0.05), dst, src, z, t, 0.05)
    assert torch.allclose(back, u, atol=1e-4)


def test_label_drop_only_in_training():
    y = torch.arange(10).repeat(50)
    torch.manual_seed(0)
    oracle = Oracle(torch.zeros(500, 3, 4, 4))
    denoiser = Denoiser(oracle, label_drop_prob=0.3)
    x = torch.zeros(500, 3, 4, 4)
    denoiser.train().loss(x, y)
    dropped = (oracle.calls[-1][2] == 10).float().mean().item()
    assert 0.24 < dropped < 0.36
    assert torch.equal(oracle.calls[-1][2][oracle.calls[-1][2] != 10], y[oracle.calls[-1][2] != 10])
    denoiser.eval().loss(x, y)
    assert torch.equal(oracle.calls[-1][2], y)


def test_sampled_times_follow_logit_normal():
    denoiser = Denoiser(Oracle(None), P_mean=-0.8, P_std=0.8)
    t = denoiser.sample_t(20000, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.03 and abs(logit.std().item() - 0.8) < 0.03


def test_unconditional_model_trains_and_samples():
    torch.manual_seed(0)
    net = JiT(input_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=1,
              bottleneck_dim=8, in_context_len=2, in_context_start=1, backend="torch")
    denoiser = Denoiser(net, label_drop_prob=0.0).train()
    loss = denoiser.loss(torch.rand(3, 3, 8, 8) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and net.final_layer.linear.weight.grad.abs().sum() > 0
    out = denoiser.generate(torch.zeros(2, dtype=torch.long), steps=2)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="pred must be one of"):
        Denoiser(Oracle(None), pred="eps")
    with pytest.raises(ValueError, match="label_drop_prob"):
        Denoiser(Oracle(None), label_drop_prob=1.0)
    denoiser = Denoiser(Oracle(torch.zeros(2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        denoiser.loss(torch.zeros(2, 3, 4, 4), t=torch.rand(3))
    with pytest.raises(ValueError, match="noise must have the images' shape"):
        denoiser.loss(torch.zeros(2, 3, 4, 4), noise=torch.rand(2, 3, 4, 5))
