"""The training step: what a CUDA-graph capture of it needs (no host tensors on its path, a
learning rate set in place, fixed shapes), and on a GPU, graph replay equal to eager steps."""
import pytest
import torch
from test_capture_safety import META, NoHostTensors, meta_denoiser

from jitfast import EMA, Denoiser, JiT
from jitfast.training.step import (GraphedTrainStep, check_like, make_optimizer, optimizer_state,
                                   set_lr, train_step)


class NoOptimizer:
    """Stands in for fused AdamW on the meta device, which has no fused kernel (the fused CUDA
    kernel reads lr and the step count from device tensors: see the gpu test below)."""

    def __init__(self, lr):
        self.param_groups = [{"lr": lr}]

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


@pytest.mark.parametrize("clip_grad", [0.0, 1.0])
def test_train_step_stays_on_the_device(backend, clip_grad):
    denoiser = meta_denoiser(backend).train()
    ema = EMA(denoiser)
    optimizer = NoOptimizer(torch.empty((), device=META))
    x = torch.empty(3, 3, 16, 16, device=META)
    y = torch.zeros(3, dtype=torch.long, device=META)
    t, noise = torch.empty(3, device=META), torch.empty_like(x)
    with NoHostTensors():
        set_lr(optimizer, 0.2)
        loss = train_step(denoiser, denoiser, optimizer, ema, x, y, t, noise, clip_grad=clip_grad)
    assert loss.shape == () and loss.device == META


def test_set_lr_writes_in_place():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    lr = torch.tensor(0.1)
    optimizer.param_groups[0]["lr"] = lr
    set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.25
    plain = torch.optim.AdamW(params, lr=0.1)
    set_lr(plain, 0.5)
    assert plain.param_groups[0]["lr"] == 0.5


def test_graphed_step_refuses_another_shape():
    like = [torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4),
            torch.zeros(4, 3, 8, 8)]
    check_like([t.clone() for t in like], like)
    with pytest.raises(ValueError, match=r"input 3 is \(3, 3, 8, 8\).*took \(4, 3, 8, 8\)"):
        check_like(like[:3] + [torch.zeros(3, 3, 8, 8)], like)
    with pytest.raises(ValueError, match="input 1 is .*float32.*took .*int64"):
        check_like([like[0], torch.zeros(4), *like[2:]], like)
    with pytest.raises(ValueError, match="4 given, the captured step took 5"):
        check_like(like, [*like, 2])
    check_like([*like, 2], [*like, 2])  # a count (pMF's flow-matching examples) must repeat
    with pytest.raises(ValueError, match="input 4 is 3, the captured step took 2"):
        check_like([*like, 3], [*like, 2])


def tiny_run(backend, graphed, steps=7, dropout=0.0):
    """Losses and final parameters of `steps` training steps on CUDA."""
    torch.manual_seed(0)
    net = JiT(input_size=32, patch_size=4, hidden_size=64, depth=4, num_heads=4,
              bottleneck_dim=16, num_classes=10, in_context_len=4, in_context_start=1,
              backend=backend, proj_drop=dropout)
    net.check_values = False
    denoiser = Denoiser(net, label_drop_prob=0.0).cuda()
    for p in denoiser.parameters():  # non-zero adaLN and head, so every weight learns
        torch.nn.init.normal_(p, std=0.05) if p.requires_grad else None
    ema = EMA(denoiser)
    optimizer = make_optimizer(denoiser.parameters(), 1e-3, torch.device("cuda"))
    step = GraphedTrainStep(denoiser, denoiser, optimizer, ema, 1.0, warmup=2) if graphed \
        else (lambda *b: train_step(denoiser, denoiser, optimizer, ema, *b, clip_grad=1.0))
    losses = []
    for i in range(steps):
        g = torch.Generator("cuda").manual_seed(i)
        x = torch.rand(6, 3, 32, 32, device="cuda", generator=g) * 2 - 1
        y = torch.randint(10, (6,), device="cuda", generator=g)
        t = torch.rand(6, device="cuda", generator=g)
        noise = torch.randn(6, 3, 32, 32, device="cuda", generator=g)
        set_lr(optimizer, 1e-3 * (i + 1))
        torch.manual_seed(100 + i)  # dropout, as the trainer seeds it
        losses.append(step(x, y, t, noise))
    params = torch.cat([p.detach().flatten() for p in denoiser.parameters()])
    shadow = torch.cat([s.flatten() for s in ema.shadows[1]])
    return torch.stack(losses).cpu(), params, shadow


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_graphed_steps_equal_eager_steps(backend, dropout):
    """Two eager warm-up steps, the capture, four replays: losses, weights and EMA as eager."""
    eager = tiny_run(backend, graphed=False, dropout=dropout)
    graphed = tiny_run(backend, graphed=True, dropout=dropout)
    assert torch.allclose(graphed[0], eager[0], rtol=1e-3, atol=1e-6), (graphed[0], eager[0])
    for got, want in zip(graphed[1:], eager[1:]):
        assert ((got - want).norm() / want.norm()).item() < 1e-3


@pytest.mark.gpu
def test_make_optimizer_reads_lr_and_step_on_the_device():
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    optimizer = make_optimizer([p], 0.1, torch.device("cuda"))
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.param_groups[0]["lr"].is_cuda
    assert all(v.is_cuda for v in optimizer.state[p].values())


def test_checkpointed_optimizer_state_holds_float_learning_rates():
    """A device lr (fused AdamW on CUDA) is saved as a float: checkpoints load anywhere."""
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.25)
    state = optimizer_state(optimizer.state_dict())
    assert type(state["param_groups"][0]["lr"]) is float and state["param_groups"][0]["lr"] == 0.25
    assert torch.is_tensor(optimizer.param_groups[0]["lr"])  # the optimizer itself untouched
    assert optimizer_state({}) == {}  # an FSDP rank that holds no gathered state


def test_graphed_step_needs_fused_adamw():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="needs fused AdamW .* got SGD"):
        GraphedTrainStep(None, None, torch.optim.SGD([p], lr=0.1), None)
    with pytest.raises(ValueError, match="got AdamW"):
        GraphedTrainStep(None, None, torch.optim.AdamW([p], lr=0.1), None)
