"""AdamWEMA (jitfast.training.optimizer): AdamW, both EMAs and the bf16 compute copies of the
weights in one pass per weight, against torch's AdamW and the EMA's own update; its state dict
is AdamW's; the copies follow their masters; a run saved and resumed repeats the uninterrupted
one bit for bit. Without a GPU the update kernel runs under TRITON_INTERPRET=1 (conftest.py)."""
import pytest
import torch

from jitfast import Denoiser, JiT
from jitfast.training.ema import EMA
from jitfast.training.optimizer import AdamWEMA
from jitfast.training.step import train_step

pytest.importorskip("triton", reason="the update kernel needs Triton")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def tiny_denoiser(seed=0):
    """A tiny JiT on the PyTorch ops (the optimizer's kernel is what is tested here)."""
    torch.manual_seed(seed)
    net = JiT(input_size=16, patch_size=4, hidden_size=36, depth=2, num_heads=3, bottleneck_dim=8,
              num_classes=5, in_context_len=3, in_context_start=1, backend="torch")
    net.check_values = False
    with torch.no_grad():  # every zero-initialised weight away from zero, so each gets a grad
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Denoiser(net, label_drop_prob=0.0)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    return x, torch.tensor([0, 1, 4]), torch.rand(3, generator=g), torch.randn(x.shape,
                                                                               generator=g)


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def test_matches_torch_adamw_and_the_ema_update():
    """float32, no copies: the weights, moments and both EMA sets after 3 steps equal those of
    torch.optim.AdamW followed by EMA.update, within float32 rounding."""
    ours, theirs = tiny_denoiser(), tiny_denoiser()
    ema_ours, ema_theirs = EMA(ours, (0.9, 0.7)), EMA(theirs, (0.9, 0.7))
    optimizer = AdamWEMA(ours, 3e-3, ema_ours, weight_decay=0.05, copies=False)
    reference = torch.optim.AdamW(theirs.parameters(), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    for step in range(3):
        for model, opt, ema in ((ours, optimizer, ema_ours), (theirs, reference, ema_theirs)):
            train_step(model, model, opt, ema, *batch(step), bf16=False)
    assert max_diff(ours.parameters(), theirs.parameters()) < 1e-6
    for k in range(2):
        assert max_diff(ema_ours.shadows[k], ema_theirs.shadows[k]) < 1e-6
    state = optimizer.state_dict()["state"]
    want = reference.state_dict()["state"]
    assert state.keys() == want.keys()
    for i in state:
        assert float(state[i]["step"]) == float(want[i]["step"]) == 3
        assert max_diff([state[i]["exp_avg"]], [want[i]["exp_avg"]]) < 1e-6


def test_compute_copies_carry_the_step_in_bf16():
    """Under bf16 autocast the forward and backward run on bf16 copies of the Linear and Conv
    weights: the grads arrive on the copies, the masters stay float32 (the checkpoint's), and
    after each update each copy is its master rounded to bf16. A master changed from outside
    (a checkpoint loaded) is copied again before the next step."""
    model = tiny_denoiser()
    ema = EMA(model)
    optimizer = AdamWEMA(model, 1e-3, ema)
    copies = optimizer.copies.entries
    assert copies and all(master.dtype == torch.float32 for _, master, _ in copies)
    seen = {}

    def spy(grad):
        seen["dtype"] = grad.dtype
    copies[0][2].register_hook(spy)
    for step in range(2):
        loss = train_step(model, model, optimizer, ema, *batch(step), bf16=True)
        assert torch.isfinite(loss)
        assert seen["dtype"] == torch.bfloat16
        for module, master, copy in copies:
            assert module.weight is master and copy.grad is None
            assert torch.equal(copy, kernel_bf16(master))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        copies[0][1].mul_(2)  # e.g. load_state_dict
    model.load_state_dict(state)
    with optimizer.swapped():
        assert torch.equal(copies[0][2], copies[0][1].to(torch.bfloat16))


def kernel_bf16(t):
    """t rounded to bf16 as the update kernel writes it: to nearest even on a GPU, as torch; the
    CPU's Triton interpreter truncates."""
    if t.is_cuda:
        return t.to(torch.bfloat16)
    return (t.detach().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def test_state_dict_is_adamws_both_ways():
    """A checkpoint of either optimizer loads into the other, and the shared step count comes
    back."""
    model = tiny_denoiser()
    ema = EMA(model)
    optimizer = AdamWEMA(model, 1e-3, ema, copies=False)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for step in range(2):
        train_step(model, model, reference, ema, *batch(step), bf16=False)
    optimizer.load_state_dict(reference.state_dict())
    steps = {id(s["step"]) for s in optimizer.state.values()}
    assert len(steps) == 1 and float(next(iter(optimizer.state.values()))["step"]) == 2
    train_step(model, model, optimizer, ema, *batch(2), bf16=False)
    reference.load_state_dict(optimizer.state_dict())
    assert float(next(iter(reference.state.values()))["step"]) == 3


@pytest.mark.parametrize("copies", [
    False,
    # the copies of a resumed run are written by torch from the loaded masters, those of the
    # uninterrupted one by the kernel: equal where both round to nearest even, as on a GPU (the
    # CPU's Triton interpreter truncates)
    pytest.param(True, marks=pytest.mark.gpu)])
def test_resumed_run_repeats_the_uninterrupted_one(copies):
    """2 steps, a checkpoint (model, optimizer, EMAs), 2 more steps in a fresh process's objects:
    bit-identical to 4 uninterrupted steps, under bf16 autocast."""
    device = "cuda" if copies else "cpu"

    def run(model, optimizer, ema, steps):
        for step in steps:
            train_step(model, model, optimizer, ema, *(b.to(device) for b in batch(step)),
                       bf16=True)

    def fresh(seed=0):
        model = tiny_denoiser(seed).to(device)
        ema = EMA(model)
        return model, AdamWEMA(model, 1e-3, ema, copies=copies), ema

    model, optimizer, ema = fresh()
    run(model, optimizer, ema, range(4))

    first, first_optimizer, first_ema = fresh()
    run(first, first_optimizer, first_ema, range(2))
    saved = {"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
             "ema": [first_ema.state_dict(k) for k in (1, 2)]}
    # other initial weights: all must come from the checkpoint
    resumed, resumed_optimizer, resumed_ema = fresh(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for k in (1, 2):
        resumed_ema.load_state_dict(saved["ema"][k - 1], k)
    run(resumed, resumed_optimizer, resumed_ema, range(2, 4))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for k in range(2):
        for a, b in zip(ema.shadows[k], resumed_ema.shadows[k]):
            assert torch.equal(a, b)
