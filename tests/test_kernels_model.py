"""The whole JiT on backend="triton" against backend="torch" (forward and every parameter
gradient), against the official parity fixture, and traced by torch.compile(fullgraph=True); the
Denoiser's loss and sampler, whose epilogues the triton backend fuses into the output head,
against the torch backend; the first three also with the SwiGLU MLP's fused matmuls
(JITFAST_FUSED_MLP=1). (Official loss and sampling parity on both backends: test_diffusion.py
and test_sampling.py.)"""
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

from jitfast import Denoiser, JiT, kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter
FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny.pt"
TINY = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=40, depth=3, num_heads=2,
            num_classes=5, bottleneck_dim=12, in_context_len=3, in_context_start=1)


@pytest.fixture(params=[False, True], ids=["mlp-cublas", "mlp-fused"])
def fused_mlp(request, monkeypatch):
    """Each test twice: the SwiGLU MLP as cuBLAS matmuls around the SwiGLU kernel, and on the
    fused matmuls (kernels/swiglu_matmul.py), which the test must then have reached."""
    from jitfast.kernels import swiglu_matmul
    monkeypatch.setattr(swiglu_matmul, "FUSED", request.param)
    calls, apply = [], swiglu_matmul.SwiGLUMLP.apply
    monkeypatch.setattr(swiglu_matmul.SwiGLUMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    yield request.param
    assert bool(calls) == request.param


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tiny_pair():
    """The same randomly initialised tiny JiT on both backends (every weight non-zero, so no
    gradient is trivially zero), with an input batch."""
    torch.manual_seed(0)
    models = [JiT(**TINY, backend=backend).to(DEVICE) for backend in ("torch", "triton")]
    with torch.no_grad():
        for param in models[0].parameters():
            param.normal_(0, 0.1)
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(3, 3, 16, 16, device=DEVICE)
    t = torch.rand(3, device=DEVICE)
    y = torch.tensor([0, 4, 5], device=DEVICE)
    return models, (x, t, y)


def forward_backward(model, inputs, run=None):
    """Output of (run or model)(*inputs) and the grads of model's parameters after a backward."""
    out = (model if run is None else run)(*inputs)
    (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_triton_backend_matches_torch_backend(fused_mlp):
    (reference, fused), inputs = tiny_pair()
    want, want_grads = forward_backward(reference, inputs)
    got, got_grads = forward_backward(fused, inputs)
    assert rel_err(got, want) < 1e-5
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(got_grads[name], grad) < 1e-5, name


def test_triton_backend_matches_official_fixture(fused_mlp):
    fixture = torch.load(FIXTURE, weights_only=True)
    model = JiT(**fixture["config"], backend="triton").to(DEVICE).eval()
    model.load_state_dict(fixture["state_dict"])
    case = {k: v.to(DEVICE) for k, v in fixture["forward"].items()}
    with torch.no_grad():
        out = model(case["x"], case["t"], case["y"])
    assert rel_err(out, case["expected"]) < 1e-5


def test_compile_fullgraph_traces_the_kernels(fused_mlp):
    """No graph break: every op has a fake implementation and a registered backward."""
    (_, fused), inputs = tiny_pair()
    want, want_grads = forward_backward(fused, inputs)
    fused.zero_grad()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    got, got_grads = forward_backward(fused, inputs, compiled)
    assert rel_err(got, want) < 1e-6
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-6, name


def spy(monkeypatch, name):
    """The argument tuples of every call of jitfast.kernels.<name> from now on."""
    calls, fn = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *args: calls.append(args) or fn(*args))
    return calls


def test_denoiser_loss_matches_torch_backend(monkeypatch):
    """JiT's objective (x-pred, v-loss) fused into the head equals the torch backend's loss, and
    so do all parameter grads; with noise_scale 2, labels dropped in training mode (the same
    draws on both backends), and t = 0.98 where max(1 - t, t_eps) clamps."""
    (reference, fused), _ = tiny_pair()
    fused_calls = spy(monkeypatch, "output_head_v_loss")
    x = torch.rand(3, 3, 16, 16, device=DEVICE) * 2 - 1
    inputs = (x, torch.tensor([0, 4, 2], device=DEVICE),
              torch.tensor([0.3, 0.7, 0.98], device=DEVICE), torch.randn_like(x))
    losses, grads = [], []
    for net in (reference, fused):
        torch.manual_seed(1)
        loss = Denoiser(net, noise_scale=2.0, label_drop_prob=0.5).train().loss(*inputs)
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad for name, p in net.named_parameters() if p.requires_grad})
    assert len(fused_calls) == 1
    assert rel_err(losses[1], losses[0]) < 1e-5
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grads[1][name], grad) < 1e-5, name


@pytest.mark.parametrize("method,steps,cfg,interval,heun_second", [
    ("heun", 3, 2.0, (0.3, 1.0), [False, True, False, True, False]),  # unguided at t = 0 only
    ("euler", 2, 3.0, (0.0, 0.4), [False, False]),  # guided at t = 0 only
])
def test_generate_matches_torch_backend(monkeypatch, method, steps, cfg, interval, heun_second):
    """Velocity, guidance and the Euler/Heun state update fused into the head at every
    evaluation (``heun_second``: whether each is Heun's second) equal the torch backend."""
    (reference, fused), _ = tiny_pair()
    fused_calls = spy(monkeypatch, "output_head_step")
    y = torch.tensor([1, 3], device=DEVICE)
    z0 = torch.randn(2, 3, 16, 16, device=DEVICE)
    want, got = (Denoiser(net, noise_scale=2.0).generate(y, steps, method, cfg, interval, z0)
                 for net in (reference, fused))
    assert [args[-2] is not None for args in fused_calls] == heun_second  # v_prev given
    assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
def test_triton_backend_under_autocast_within_twice_torch_error():
    """bf16 autocast on the GPU: against the float32 model, the triton backend's error (output
    and parameter grads) is at most twice that of the torch backend under the same autocast."""
    (reference, fused), inputs = tiny_pair()
    exact, exact_grads = forward_backward(reference, inputs)
    errors = {}
    for model in (reference, fused):
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            out, grads = forward_backward(model, inputs)
        errors[model.backend] = [rel_err(out, exact)] + [rel_err(grads[name], grad)
                                                         for name, grad in exact_grads.items()]
    for i, (err, baseline) in enumerate(zip(errors["triton"], errors["torch"])):
        assert err <= 2 * baseline + 1e-6, f"tensor {i}: {err:.2e} vs torch {baseline:.2e}"


def training_run(backend, steps):
    """Losses and final weights of `steps` training steps (AdamW, both EMAs, float32) of a tiny
    JiT on the built-in shapes dataset, with the trainer's step, on one backend."""
    from jitfast.training.ema import EMA
    from jitfast.training.shapes import ShapesDataset
    from jitfast.training.step import make_optimizer, train_step

    torch.manual_seed(0)
    net = JiT(**{**TINY, "num_classes": 10}, backend=backend)
    net.check_values = False
    denoiser = Denoiser(net).to(DEVICE)
    ema = EMA(denoiser)
    optimizer = make_optimizer(denoiser.parameters(), 1e-3, torch.device(DEVICE))
    data = ShapesDataset(16, length=64)
    losses = []
    for step in range(steps):
        images, labels, _ = data.__getitems__([(i, False) for i in range(step * 4, step * 4 + 4)])
        x = images.to(DEVICE).float() / 127.5 - 1 if not images.is_floating_point() \
            else images.to(DEVICE)
        g = torch.Generator().manual_seed(step)
        t, noise = denoiser.sample_t(4, generator=g), torch.randn(x.shape, generator=g)
        torch.manual_seed(step)  # label drops
        losses.append(train_step(denoiser, denoiser, optimizer, ema, x, labels.to(DEVICE),
                                 t.to(DEVICE), noise.to(DEVICE)).item())
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in net.parameters()])


def test_training_loss_curve_matches_torch_backend():
    """12 steps of training in float32: the fused kernels' loss curve and final weights follow
    the reference's (on a GPU, benchmarks measure the bf16 curve)."""
    (fused, fused_weights), (reference, weights) = (training_run(b, 12)
                                                   for b in ("triton", "torch"))
    assert reference.std() > 0.01 and rel_err(weights, training_run("torch", 0)[1]) > 1e-3
    assert torch.allclose(fused, reference, rtol=1e-4, atol=0), (fused, reference)
    assert rel_err(fused_weights, weights) < 1e-5
