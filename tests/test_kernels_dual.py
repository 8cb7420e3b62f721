"""Forward-mode derivatives of the ops (pMF's objective): each reference ``*_dual`` of
jitfast.functional.ops against torch.func.jvp of the op it differentiates (the math attention
for attention), and each fused kernel's dual form against that reference, in float32 on small
odd shapes, under TRITON_INTERPRET=1 without a GPU; gradients through a dual op's values are
the plain op's. bf16 on the GPU: within 4× the reference's own bf16 error (``-m gpu``)."""
import importlib

import pytest
import torch
from torch.func import jvp

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")

from jitfast import kernels  # noqa: E402
from jitfast.functional import ops as ref  # noqa: E402
from jitfast.functional.positions import rope_2d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bshd(B, H, N, hd):
    """A (B, H, N, hd) tensor laid out (B, N, H, hd), as the q/k op writes them."""
    return randn(B, N, H, hd).transpose(1, 2)


# name -> (make(): (primal function of the tangent-carrying inputs, those inputs, the dual's
# call of (module, inputs, tangents)), its outputs)
def norm_case(B, N, D):
    gate, w, shift, scale = randn(B, D), randn(D), randn(B, D), randn(B, D)
    return (lambda x: ref.rms_norm_modulate(x, w, shift, scale), [randn(B, N, D)],
            lambda m, x, tx: m.rms_norm_modulate_dual(x, w, shift, scale, tx))


def gated_norm_case(B, N, D, skip=0, bias=True):
    gate, w, shift, scale = randn(B, D), randn(D), randn(B, D), randn(B, D)
    h_bias = randn(D) if bias else None
    return (lambda x, h: ref.gated_residual_rms_norm_modulate(x, h, gate, w, shift, scale,
                                                              h_bias=h_bias, skip=skip),
            [randn(B, N, D), randn(B, N, D)],
            lambda m, x, h, tx, th: m.gated_residual_rms_norm_modulate_dual(
                x, h, gate, w, shift, scale, tx, th, h_bias=h_bias, skip=skip))


def gated_case(B, N, D):
    gate = randn(B, D)
    return (lambda x, h: ref.gated_residual(x, h, gate), [randn(B, N, D), randn(B, N, D)],
            lambda m, x, h, tx, th: m.gated_residual_dual(x, h, gate, tx, th))


def qk_case(B, grid, prefix, H, hd, bias=False):
    cos, sin = (t.to(DEVICE) for t in rope_2d(hd, grid, prefix))
    N = prefix + grid * grid
    wq, wk, b = randn(hd), randn(hd), randn(3 * H * hd) if bias else None
    return (lambda qkv: ref.qk_norm_rope(qkv, H, wq, wk, cos, sin, bias=b),
            [randn(B, N, 3 * H * hd)],
            lambda m, qkv, tqkv: m.qk_norm_rope_dual(qkv, H, wq, wk, cos, sin, tqkv, bias=b))


def swiglu_case(*shape, bias=False):
    b = randn(shape[-1]) if bias else None
    return (lambda x12: ref.swiglu(x12, b), [randn(*shape)],
            lambda m, x12, t12: m.swiglu_dual(x12, t12, b))


def patch_case(B, C, H, W, p, K, D):
    w1, w2, b2, pos = randn(K, C, p, p), randn(D, K, 1, 1), randn(D), randn(1, H * W // p ** 2, D)
    return (lambda x: ref.patch_embed(x, w1, w2, b2, pos), [randn(B, C, H, W)],
            lambda m, x, tx: m.patch_embed_dual(x, w1, w2, b2, pos, tx))


def attention_case(B, H, N, hd):
    """The tangent alone (the primal is SDPA's): outputs (o, to) from the reference, to from
    the kernel."""
    return (lambda q, k, v: ref.attention(q, k, v), [bshd(B, H, N, hd) for _ in range(3)],
            lambda m, q, k, v, tq, tk, tv: (ref.attention(q, k, v),
                                            m.attention_tangent(q, k, v, tq, tk, tv)))


def head_case(B, grid, p, C, D):
    """pMF's head: the average velocity (z - x̂)/clip(t, 0.05, 1) of x̂ = head(u), along the
    tangents of u, z and t; one t below 0.05, where clip's derivative vanishes."""
    w, b = randn(p * p * C, D), randn(p * p * C)
    t = torch.linspace(0.02, 0.9, B, device=DEVICE)
    return (lambda u, z, t: (z - ref.output_head(u, w, b, p, C)) / t.clamp(0.05, 1).view(
                -1, 1, 1, 1),
            [randn(B, grid * grid, D), randn(B, C, grid * p, grid * p), t],
            lambda m, u, z, t, tu, tz, tt: m.pmf_head_dual(u, w, b, z, t, tu, tz, tt, p))


CASES = {
    "norm-3x37x72": lambda: norm_case(3, 37, 72),
    "norm-1x5x1664": lambda: norm_case(1, 5, 1664),
    "gated-norm-2x9x40": lambda: gated_norm_case(2, 9, 40, bias=False),
    "gated-norm-bias-skip-3x37x72": lambda: gated_norm_case(3, 37, 72, skip=5),
    "gated-3x5x40": lambda: gated_case(3, 5, 40),
    "qk-3x(5+16)x4x20": lambda: qk_case(3, 4, 5, 4, 20),
    "qk-bias-2x(4+9)x12x64": lambda: qk_case(2, 3, 4, 12, 64, bias=True),
    "qk-1x(1+4)x2x104": lambda: qk_case(1, 2, 1, 2, 104),
    "swiglu-3x7x80": lambda: swiglu_case(3, 7, 80),
    "swiglu-bias-11x2400": lambda: swiglu_case(11, 2400, bias=True),
    "patch-2x3x12x12-p4": lambda: patch_case(2, 3, 12, 12, 4, 10, 40),
    "patch-2x1x18x30-p6": lambda: patch_case(2, 1, 18, 30, 6, 20, 40),
    # keys spanning several blocks, the last one partial; hd below, at and off a power of two
    "attention-2x3x11x16": lambda: attention_case(2, 3, 11, 16),
    "attention-1x2x77x20": lambda: attention_case(1, 2, 77, 20),
    "attention-2x12x70x64": lambda: attention_case(2, 12, 70, 64),
    "pmf-head-3x9x40-p4": lambda: head_case(3, 3, 4, 3, 40),
}


def flat(outputs):
    return [t for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


@pytest.mark.parametrize("name", CASES)
def test_reference_dual_is_the_jvp(name):
    """The written-out tangents equal torch.func.jvp of the op (float32, 1e-6)."""
    torch.manual_seed(0)
    primal, inputs, dual = CASES[name]()
    tangents = [torch.randn_like(t) for t in inputs]
    want_out, want_tan = jvp(primal, tuple(inputs), tuple(tangents))
    got = flat(dual(ref, *inputs, *tangents))
    values, tans = flat(want_out), flat(want_tan)
    if name.startswith("attention"):  # (o, to) against jvp's (o, to)
        values, tans = values[:1], tans[:1]
        got = [got[0], ref.attention_tangent(*inputs, *tangents)]
    assert len(got) == len(values) + len(tans)
    for i, (g, w) in enumerate(zip(got, values + tans)):
        assert g.shape == w.shape and rel_err(g, w) < 1e-6, f"output {i}: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("name", CASES)
def test_kernel_dual_matches_reference(name):
    """Every value and tangent of the fused dual form within 1e-5 of the reference's."""
    torch.manual_seed(0)
    _, inputs, dual = CASES[name]()
    tangents = [torch.randn_like(t) for t in inputs]
    want = flat(dual(ref, *inputs, *tangents))
    got = flat(dual(kernels, *inputs, *tangents))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {i}: {g.shape} vs {w.shape}"
        assert rel_err(g, w) < 1e-5, f"output {i}: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("config", range(4))
@pytest.mark.parametrize("name,module", [("norm-3x37x72", "norm"),
                                         ("gated-norm-bias-skip-3x37x72", "norm"),
                                         ("qk-bias-2x(4+9)x12x64", "qk_norm_rope")])
def test_every_tile_config_of_the_dual_forms(monkeypatch, name, module, config):
    """The dual forms share the forward kernels' row tiles: each autotune config, pinned."""
    module = importlib.import_module(f"jitfast.kernels.{module}")
    kernel = next(k for k in vars(module).values() if isinstance(k, triton.runtime.Autotuner)
                  and k.base_fn.__name__.endswith("_fwd"))
    monkeypatch.setattr(kernel, "configs", [module.FWD_CONFIGS[config]])
    test_kernel_dual_matches_reference(name)


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("attention")])
def test_gradients_through_a_dual_op_are_the_plain_ops(name):
    """Backpropagating through the values of a fused dual op gives the grads of the plain op
    (the tangents carry none)."""
    torch.manual_seed(0)
    primal, inputs, dual = CASES[name]()
    tangents = [torch.randn_like(t) for t in inputs]
    grads = []
    for run in (lambda xs: flat(primal(*xs)),
                lambda xs: flat(dual(kernels, *xs, *tangents))[:len(flat(primal(*inputs)))]):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outputs = run(leaves)
        weights = [torch.linspace(-1, 1, o.numel(), device=DEVICE).view_as(o) for o in outputs]
        sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
        grads.append([leaf.grad for leaf in leaves])
    for i, (got, want) in enumerate(zip(grads[1], grads[0])):
        assert rel_err(got, want) < 1e-5, f"grad of input {i}: {rel_err(got, want):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_bf16_dual_error_within_four_times_pytorch(name):
    """bf16 on the GPU: against the float64 reference, the kernel's values and tangents err
    at most 4× the reference's own bf16 run (the tangents multiply two rounded factors)."""
    torch.manual_seed(0)
    _, inputs, dual = CASES[name]()
    tangents = [torch.randn_like(t) for t in inputs]
    exact = flat(dual(ref, *(t.double() for t in inputs), *(t.double() for t in tangents)))
    errors = {}
    for module in (ref, kernels):
        low = flat(dual(module, *(t.bfloat16() for t in inputs),
                        *(t.bfloat16() for t in tangents)))
        errors[module] = [rel_err(o, e) for o, e in zip(low, exact)]
    for i, (err, base) in enumerate(zip(errors[kernels], errors[ref])):
        assert err <= 4 * base + 1e-3, f"output {i}: {err:.2e} vs PyTorch bf16 {base:.2e}"
