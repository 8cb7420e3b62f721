"""Each fused Triton kernel against the PyTorch reference of the same name in
jitfast.functional.ops: forward and every gradient in float32 on small odd shapes; the head's
v-loss, sampling velocity and sampler-step epilogues against the Denoiser/sampler formulas;
torch.library.opcheck of every
registered op; bf16 on the GPU (marked gpu). Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (set in conftest.py)."""
import importlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")

from jitfast import kernels  # noqa: E402
from jitfast.diffusion.denoiser import convert  # noqa: E402
from jitfast.functional import ops as ref  # noqa: E402
from jitfast.functional.ode import ode_update  # noqa: E402
from jitfast.functional.positions import rope_2d  # noqa: E402
from jitfast.kernels import _common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def identity_call(f, *args):
    return f(*args)


def norm_case(name, B, N, D):
    inputs = {"rms_norm": lambda r: [r(B, N, D), r(D)],
              "rms_norm_modulate": lambda r: [r(B, N, D), r(D), r(B, D), r(B, D)],
              "gated_residual": lambda r: [r(B, N, D), r(B, N, D), r(B, D)],
              "gated_residual_rms_norm_modulate":
                  lambda r: [r(B, N, D), r(B, N, D), r(B, D), r(D), r(B, D), r(B, D)]}[name]
    return pytest.param(name, lambda r: (inputs(r), identity_call), id=f"{name}-{B}x{N}x{D}")


def h_bias_case(name, B, N, D, skip=0):
    """The block's residual updates with the bias of the Linear that made h (that Linear runs
    without it), and the final layer's form: u of the tokens from `skip` on."""
    def make(r):
        if name == "gated_residual":
            return [r(B, N, D), r(B, N, D), r(B, D), r(D)], identity_call

        def call(f, x, h, gate, w, shift, scale, bias):
            return f(x, h, gate, w, shift, scale, h_bias=bias, skip=skip)
        return [r(B, N, D), r(B, N, D), r(B, D), r(D), r(B, D), r(B, D), r(D)], call
    return pytest.param(name, make, id=f"{name}-bias-skip{skip}-{B}x{N}x{D}")


def final_norm_case(B, N, D, skip):
    """The final layer: only u is used (x_new gets no grad), from token `skip` on."""
    def make(r):
        def call(f, x, h, gate, w, shift, scale, bias):
            return f(x, h, gate, w, shift, scale, h_bias=bias, skip=skip)[1]
        return [r(B, N, D), r(B, N, D), r(B, D), r(D), r(B, D), r(B, D), r(D)], call
    return pytest.param("gated_residual_rms_norm_modulate", make,
                        id=f"final-norm-skip{skip}-{B}x{N}x{D}")


def strided_case():
    """A norm of a slice that drops the in-context tokens (pMF's final layer)."""
    def make(r):
        x = r(2, 9, 40)[:, 4:]
        assert not x.is_contiguous()
        return [x, r(40), r(2, 40), r(2, 40)], identity_call
    return pytest.param("rms_norm_modulate", make, id="rms_norm_modulate-strided")


def modulation_case(B, N, D):
    """The block's gate, shift and scale: chunks (row stride 3D) of one modulation tensor."""
    def call(f, x, h, modulation, w):
        gate, shift, scale = modulation.chunk(3, dim=-1)
        return f(x, h, gate, w, shift, scale)
    return pytest.param("gated_residual_rms_norm_modulate",
                        lambda r: ([r(B, N, D), r(B, N, D), r(B, 3 * D), r(D)], call),
                        id=f"gated_residual_rms_norm_modulate-chunks-{B}x{N}x{D}")


def swiglu_case(*shape, bias=False):
    if not bias:
        return pytest.param("swiglu", lambda r: ([r(*shape)], identity_call),
                            id="swiglu-" + "x".join(map(str, shape)))
    return pytest.param("swiglu", lambda r: ([r(*shape), r(shape[-1])],
                                             lambda f, x12, b: f(x12, bias=b)),
                        id="swiglu-bias-" + "x".join(map(str, shape)))


def fused_mlp_call(f, *args):
    """f(*args) with the SwiGLU MLP's fused matmuls on (JITFAST_FUSED_MLP=1)."""
    module = importlib.import_module("jitfast.kernels.swiglu_matmul")
    saved, module.FUSED = module.FUSED, True
    try:
        return f(*args)
    finally:
        module.FUSED = saved


def swiglu_mlp_case(B, N, D, F, D_out, bias):
    """x (B, N, D), w12 (2F, D), the bias (2F,) or None, w3 (D_out, F)."""
    def make(r):
        inputs = [r(B, N, D), r(2 * F, D), r(2 * F), r(D_out, F)]
        if bias:
            return inputs, fused_mlp_call
        return [inputs[0], inputs[1], inputs[3]], \
            lambda f, x, w12, w3: fused_mlp_call(f, x, w12, None, w3)
    return pytest.param("swiglu_mlp", make,
                        id=f"swiglu_mlp-{'bias-' if bias else ''}{B}x{N}x{D}-{F}-{D_out}")


# row and column tiles cut by M = B·N and F (two of each at 130 × 136: the bias grad's partial
# sums of two row tiles), K = D past and short of a BLOCK_K
SWIGLU_MLP_CASES = [swiglu_mlp_case(2, 7, 40, 24, 40, True),
                    swiglu_mlp_case(3, 5, 72, 100, 56, False),
                    swiglu_mlp_case(1, 130, 96, 136, 72, True)]


def qk_case(B, grid, prefix, H, hd, real_tables, bias=False):
    """RoPE tables from positions.rope_2d (kept float32, as the model's buffers) or random; with
    the qkv Linear's bias (3D,), whose gradient the op forms (ops.bias_gradient_here)."""
    N = prefix + grid * grid

    def make(r):
        if real_tables:
            cos, sin = (t.to(DEVICE) for t in rope_2d(hd, grid, prefix))
        else:
            cos, sin = r(N, hd), r(N, hd)
        inputs = [r(B, N, 3 * H * hd), r(hd), r(hd)]
        if bias:
            return (inputs + [r(3 * H * hd)],
                    lambda f, qkv, wq, wk, b: f(qkv, H, wq, wk, cos, sin, bias=b))
        return inputs, lambda f, qkv, wq, wk: f(qkv, H, wq, wk, cos, sin)
    return pytest.param("qk_norm_rope", make,
                        id=f"qk_norm_rope-{'bias-' if bias else ''}{B}x{N}x{H}x{hd}")


def patch_embed_case(B, C, H, W, p, K, D, noisy=False, learned_pos=False,
                     in_matmul_dtype=False):
    """With noisy, the training objective's input z = t·x + (1 - t)·s·noise formed inside: the
    grads of x and of the noise too; with learned_pos, the position table's grad (pMF's); with
    in_matmul_dtype, the output in the matmuls' dtype (JiT's)."""
    def make(r):
        pos = r(1, (H // p) * (W // p), D)
        inputs = [r(B, C, H, W), r(K, C, p, p), r(D, K, 1, 1), r(D)]
        if learned_pos:
            return inputs + [pos], lambda f, x, w1, w2, b2, pos: f(x, w1, w2, b2, pos)
        if not noisy:
            return inputs, lambda f, x, w1, w2, b2: f(x, w1, w2, b2, pos)
        t = torch.linspace(0.1, 0.9, B, device=DEVICE)
        return (inputs + [r(B, C, H, W)],
                lambda f, x, w1, w2, b2, noise: f(x, w1, w2, b2, pos, noise, t, 1.7,
                                                  in_matmul_dtype=in_matmul_dtype))
    kind = "noisy-" if noisy else "pos-" if learned_pos else ""
    kind += "matmul-dtype-" if in_matmul_dtype else ""
    return pytest.param("patch_embed", make, id=f"patch_embed-{kind}{B}x{C}x{H}x{W}-p{p}-{K}-{D}")


def output_head_case(B, grid, p, C, D):
    def make(r):
        return ([r(B, grid * grid, D), r(p * p * C, D), r(p * p * C)],
                lambda f, u, w, b: f(u, w, b, p, C))
    return pytest.param("output_head", make, id=f"output_head-{B}x{grid * grid}x{D}-p{p}-{C}")


NORM_OPS = ["rms_norm", "rms_norm_modulate", "gated_residual", "gated_residual_rms_norm_modulate"]
# Row tiles: a sample's tokens split into several tiles, the last one partial (37 tokens), and
# all rows as one run of 111 (rms_norm); JiT-B's width (768 of 1024 lanes, tiles of 1 to 8 rows)
# and JiT-G's (1664 of 2048: a row of more lanes than some tiles' budget, BLOCK_M = 1).
TILED_NORM_CASES = [*(norm_case(name, 3, 37, 72) for name in NORM_OPS),
                    norm_case("gated_residual_rms_norm_modulate", 2, 9, 768),
                    norm_case("gated_residual_rms_norm_modulate", 1, 5, 1664),
                    h_bias_case("gated_residual_rms_norm_modulate", 3, 37, 72, skip=5),
                    final_norm_case(3, 37, 72, 11)]
# (token, head) row tiles spanning tokens and samples (252 and 312 rows), JiT-B's heads
# (12 × 64) and JiT-G's head dim (104 of 128 lanes).
TILED_QK_CASES = [qk_case(3, 4, 5, 4, 20, True), qk_case(2, 3, 4, 12, 64, True),
                  qk_case(1, 2, 1, 2, 104, True), qk_case(2, 3, 4, 12, 64, True, bias=True)]
CASES = [
    *(norm_case(name, *shape) for name in NORM_OPS
      for shape in [(1, 7, 40), (3, 5, 72), (2, 33, 40)]),
    *TILED_NORM_CASES,
    strided_case(), modulation_case(3, 5, 40),
    h_bias_case("gated_residual", 3, 5, 40),
    h_bias_case("gated_residual_rms_norm_modulate", 2, 9, 72), final_norm_case(2, 9, 40, 4),
    swiglu_case(3, 7, 2 * 40), swiglu_case(2, 5, 2 * 72), swiglu_case(11, 2 * 36),
    # the bias grad's row chunks: rows spread over several programs and column blocks
    swiglu_case(3, 7, 2 * 40, bias=True), swiglu_case(37, 2 * 600, bias=True),
    *SWIGLU_MLP_CASES,
    qk_case(1, 2, 3, 5, 8, True), qk_case(3, 3, 0, 2, 12, False), qk_case(2, 2, 1, 3, 20, True),
    *TILED_QK_CASES,
    # the bias grad per (head, lane): 5 heads padded to 8 rows a token (JiT-B's 12 to 16 above)
    qk_case(3, 4, 5, 5, 20, True, bias=True),
    # odd token counts, a non-square image, and C·p² = 108 spanning two 64-wide gather blocks
    patch_embed_case(1, 3, 8, 8, 4, 10, 40), patch_embed_case(3, 3, 12, 12, 4, 16, 72),
    patch_embed_case(2, 1, 18, 30, 6, 20, 40), patch_embed_case(2, 3, 12, 12, 6, 12, 40),
    patch_embed_case(3, 3, 12, 12, 4, 16, 72, noisy=True),
    patch_embed_case(2, 1, 18, 30, 6, 20, 40, noisy=True),
    patch_embed_case(2, 1, 18, 30, 6, 20, 40, noisy=True, in_matmul_dtype=True),
    patch_embed_case(2, 3, 12, 12, 4, 16, 40, learned_pos=True),
    output_head_case(1, 2, 4, 3, 40), output_head_case(3, 3, 4, 3, 72),
    output_head_case(2, 5, 2, 1, 40),
]


def run(name, module, inputs, call, out_grads=None):
    """module.<name> on fresh leaf copies of inputs, then a backward of out_grads (random if not
    given): (outputs, out_grads, input grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = call(getattr(module, name), *leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if out_grads is None:
        out_grads = [torch.randn_like(t) for t in outputs]
    torch.autograd.backward(outputs, [g.to(t.dtype) for g, t in zip(out_grads, outputs)])
    return outputs, out_grads, [t.grad for t in leaves]


@pytest.mark.parametrize("name,make", CASES)
def test_kernel_matches_reference(name, make):
    """Forward outputs and every input gradient within 1e-5 relative error in float32."""
    torch.manual_seed(0)
    inputs, call = make(randn)
    want, out_grads, want_grads = run(name, ref, inputs, call)
    got, _, got_grads = run(name, kernels, inputs, call, out_grads)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}"
        assert rel_err(g, w) < 1e-5, f"output {i}: {rel_err(g, w):.2e}"
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g is not None and g.shape == w.shape, f"grad of input {i}"
        assert rel_err(g, w) < 1e-5, f"grad of input {i}: {rel_err(g, w):.2e}"


def test_swiglu_mlp_refuses_mismatched_weights():
    """The fused matmuls index the weights by the shapes of x and w3: a w12 or bias of another
    shape is an error that names the shapes, not a wrong result."""
    x, w3 = randn(2, 3, 8), randn(8, 5)
    for w12, bias in ((randn(10, 7), None), (randn(12, 8), None), (randn(10, 8), randn(12))):
        with pytest.raises(ValueError, match=r"need w12 of shape \(10, 8\)"):
            kernels.swiglu_mlp(x, w12, bias, w3)


def test_qk_norm_rope_v_is_a_view_of_qkv():
    """v is qkv's v part where the Linear wrote it (no copy), and its grad reaches qkv through
    the one backward kernel, beside q's and k's; no q/k value is read from v's part."""
    torch.manual_seed(0)
    B, N, H, hd = 2, 5, 3, 8
    qkv = randn(B, N, 3 * H * hd).requires_grad_()
    tables = randn(N, hd), randn(N, hd)
    q, k, v = kernels.qk_norm_rope(qkv, H, randn(hd), randn(hd), *tables)
    assert v.data_ptr() == qkv.data_ptr() + 2 * H * hd * qkv.element_size()
    assert torch.equal(v, qkv.detach().unflatten(-1, (3, H, hd))[:, :, 2].transpose(1, 2))
    dv = randn(*v.shape)
    torch.autograd.backward((q, k, v), (torch.zeros_like(q), torch.zeros_like(k), dv))
    assert torch.equal(qkv.grad.unflatten(-1, (3, H, hd))[:, :, 2], dv.transpose(1, 2))
    assert not qkv.grad[..., :2 * H * hd].any()
    with torch.no_grad():
        qkv_nan_v = qkv.clone()
        qkv_nan_v[..., 2 * H * hd:] = float("nan")
        q2, k2, _ = kernels.qk_norm_rope(qkv_nan_v, H, *(randn(hd) for _ in range(2)), *tables)
    assert not (q2.isnan().any() or k2.isnan().any())


TILE_MODULES = {"qk_norm_rope": importlib.import_module("jitfast.kernels.qk_norm_rope"),
                "swiglu": importlib.import_module("jitfast.kernels.swiglu"),
                "swiglu_mlp": importlib.import_module("jitfast.kernels.swiglu_matmul"),
                "output_head": importlib.import_module("jitfast.kernels.output_head"),
                **dict.fromkeys(NORM_OPS, importlib.import_module("jitfast.kernels.norm"))}


def tile_configs(module, kernel_name):
    """The autotune configs of one of the module's kernels: its forward's or backward's, or
    the module's one list."""
    if hasattr(module, "CONFIGS"):
        return module.CONFIGS
    return module.FWD_CONFIGS if kernel_name.endswith("_fwd") else module.BWD_CONFIGS


TILE_CONFIGS = max(len(configs) for m in TILE_MODULES.values()
                   for configs in (getattr(m, "FWD_CONFIGS", ()), getattr(m, "BWD_CONFIGS", ()),
                                   getattr(m, "CONFIGS", ())))


@pytest.mark.parametrize("config", range(TILE_CONFIGS))
@pytest.mark.parametrize("name,make", [*(norm_case(name, 1, 7, 40) for name in NORM_OPS),
                                       *TILED_NORM_CASES, qk_case(1, 2, 3, 5, 8, True),
                                       *TILED_QK_CASES, swiglu_case(37, 2 * 600, bias=True),
                                       SWIGLU_MLP_CASES[2],
                                       output_head_case(3, 3, 4, 3, 72)])
def test_every_tile_config_matches_reference(monkeypatch, name, make, config):
    """test_kernel_matches_reference with the row-tile kernels pinned to their config-th autotune
    config (forward and backward), not only the first that the interpreter's autotune keeps:
    every tile shape, including tiles of more rows than the op has (7 tokens in tiles of up to
    128 rows; 35 (token, head) rows in tiles of up to 1024) and rows wider than the tile's budget
    (D = 1664, one row a tile)."""
    module = TILE_MODULES[name]
    for kernel in vars(module).values():
        if isinstance(kernel, triton.runtime.Autotuner):
            configs = tile_configs(module, kernel.base_fn.__name__)
            monkeypatch.setattr(kernel, "configs", [configs[config % len(configs)]])
    test_kernel_matches_reference(name, make)


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", CASES)
def test_kernel_bf16_error_within_twice_pytorch(name, make):
    """bf16 on the GPU, flash-attention's rule: against a float64 reference, the kernel's error
    (outputs and grads) is at most twice that of the PyTorch reference run in bf16."""
    torch.manual_seed(0)
    inputs, call = make(lambda *shape: torch.randn(*shape, device="cuda"))
    exact, out_grads, exact_grads = run(name, ref, [t.double() for t in inputs], call)
    results = {}
    for module in (ref, kernels):
        outs, _, grads = run(name, module, [t.bfloat16() for t in inputs], call, out_grads)
        results[module] = [rel_err(o, e) for o, e in zip(outs + tuple(grads),
                                                            exact + tuple(exact_grads))]
    for i, (err, baseline) in enumerate(zip(results[kernels], results[ref])):
        assert err <= 2 * baseline + 1e-6, f"tensor {i}: {err:.2e} vs PyTorch bf16 {baseline:.2e}"


def test_cpu_tensors_use_the_reference_without_interpreter(monkeypatch):
    """Off the interpreter, CPU tensors never reach a Triton launch."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.randn(2, 3, 8)

    def fail(*args):
        raise AssertionError("Triton op called for a CPU tensor")
    monkeypatch.setattr(importlib.import_module("jitfast.kernels.swiglu"), "swiglu_op", fail)
    assert torch.equal(kernels.swiglu(x), ref.swiglu(x))


def v_loss_reference(u, weight, bias, x, t, p, t_eps):
    """Denoiser.loss's x-prediction v-loss on the head's output, for a noisy state z."""
    z = torch.randn_like(x)
    t_b = t.view(-1, 1, 1, 1)
    estimate = convert(ref.output_head(u, weight, bias, p, x.shape[1]).float(), "x", "v", z, t_b,
                       t_eps)
    return (estimate - convert(x, "x", "v", z, t_b, t_eps)).pow(2).mean()


def velocity_reference(u, weight, bias, z, t, p, t_eps, cfg=None):
    """The sampler's velocity as sampling.network_velocity forms it (x-prediction)."""
    guided = cfg is not None
    z2, t2 = (torch.cat([z, z]), t.expand(z.shape[0]).repeat(2)) if guided else (z, t)
    v = convert(ref.output_head(u, weight, bias, p, z.shape[1]).float(), "x", "v", z2,
                t2.view(-1, 1, 1, 1), t_eps)
    if not guided:
        return v
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


def assert_same_value_and_grads(reference, fused, inputs, *args):
    """Same value and the same grads of every input (u, weight, bias of the head)."""
    values, grads = [], []
    for fn in (reference, fused):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        value = fn(*leaves, *args)
        weights = torch.linspace(-1, 1, value.numel(), device=DEVICE).view_as(value)
        (value * weights).sum().backward()
        values.append(value)
        grads.append([leaf.grad for leaf in leaves])
    assert rel_err(values[1], values[0]) < 1e-5
    for i, (want, got) in enumerate(zip(*grads)):
        assert rel_err(got, want) < 1e-5, f"grad of input {i}: {rel_err(got, want):.2e}"


def head_inputs(rows, grid, p, C, D):
    return [randn(rows, grid * grid, D), randn(p * p * C, D), randn(p * p * C)]


@pytest.mark.parametrize("B,grid,p,C,D", [(1, 2, 4, 3, 40), (3, 3, 4, 3, 72)])
def test_output_head_v_loss(B, grid, p, C, D):
    """The loss and its grads; t near 1 exercises the t_eps clamp."""
    torch.manual_seed(0)
    x = randn(B, C, grid * p, grid * p)
    t = torch.linspace(0.3, 0.99, B, device=DEVICE)
    assert_same_value_and_grads(v_loss_reference, kernels.output_head_v_loss,
                               head_inputs(B, grid, p, C, D), x, t, p, 0.05)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("B,grid,p,C,D,per_sample_t", [(1, 2, 4, 3, 40, False),
                                                        (3, 3, 4, 3, 72, True)])
def test_output_head_velocity(B, grid, p, C, D, per_sample_t, guided):
    """The sampler's (guided) velocity and its grads, t shared (1,) as in sampling or (B,)."""
    torch.manual_seed(0)
    z = randn(B, C, grid * p, grid * p)
    t = torch.linspace(0.2, 0.98, B, device=DEVICE) if per_sample_t else randn(1).sigmoid()
    cfg = torch.tensor([2.5], device=DEVICE) if guided else None
    assert_same_value_and_grads(velocity_reference, kernels.output_head_velocity,
                               head_inputs(B * (1 + guided), grid, p, C, D), z, t, p, 0.05, cfg)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("heun_second", [False, True])
def test_output_head_step(guided, heun_second):
    """The sampler's state after an Euler step (with the velocity, which Heun's first evaluation
    keeps) or after Heun's second evaluation (at t = 0.97, where 1 - t clamps), against
    ode_update of the sampler's velocity; dt as a float or a (1,) tensor."""
    torch.manual_seed(0)
    B, grid, p, C, D = 3, 3, 4, 3, 72
    u, weight, bias = head_inputs(B * (1 + guided), grid, p, C, D)
    base = randn(B, C, grid * p, grid * p)
    dt = torch.tensor([0.4], device=DEVICE) if guided else 0.4
    heun = (randn(*base.shape), base) if heun_second else ()  # v_prev, base
    z = base + dt * heun[0] if heun_second else base
    t = torch.tensor([0.97 if heun_second else 0.3], device=DEVICE)
    cfg = torch.tensor([2.5], device=DEVICE) if guided else None
    want_state, want_v = ode_update(velocity_reference(u, weight, bias, z, t, p, 0.05, cfg), z,
                                    dt, *heun)
    state, v = kernels.output_head_step(u, weight, bias, z, t, dt, p, 0.05, cfg, *heun)
    assert state.dtype == torch.float32
    assert rel_err(state - base, want_state - base) < 1e-5  # the increment dt·v
    if heun_second:
        assert v.numel() == 0
    else:
        assert rel_err(v, want_v) < 1e-5


MATMUL_CASES = [case for case in CASES if case.values[0] in ("patch_embed", "output_head")]


@pytest.mark.parametrize("name,make", MATMUL_CASES)
def test_autocast_output_dtype_matches_reference(name, make):
    """Under autocast the matmul ops take autocast's dtype where the reference's matmuls do
    (values are not compared: the interpreter's bf16 tl.dot is wrong; the GPU tests cover them)."""
    torch.manual_seed(0)
    inputs, call = make(randn)
    with torch.autocast(DEVICE, torch.bfloat16):
        got = call(getattr(kernels, name), *inputs)
        want = call(getattr(ref, name), *inputs)
    assert got.dtype == want.dtype and got.shape == want.shape


@pytest.mark.parametrize("name,make", MATMUL_CASES)
def test_autocast_weight_grads_multiply_bf16(name, make):
    """Under autocast the weight grads, reductions over all tokens left to cuBLAS, multiply bf16
    operands (accumulating in float32), as the reference's backward does: no float32 GEMM and no
    float32 copies of (tokens × features) operands. Every matmul of the backward is checked."""
    torch.manual_seed(0)
    inputs, call = make(randn)
    leaves = [t.requires_grad_() for t in inputs]
    with torch.autocast(DEVICE, torch.bfloat16):
        out = call(getattr(kernels, name), *leaves)
    with torch.profiler.profile(record_shapes=True) as profile:
        out.float().sum().backward()
    matmuls = [event for event in profile.events()
               if event.name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")]
    assert matmuls, "no matmul recorded"
    for event in matmuls:  # the profiler's name of float32 is "float"
        assert "float" not in event.input_dtypes, (event.name, event.input_shapes)


def opcheck_cases():
    """(op, args) for every registered forward op, in each of its forms, and backward op."""
    torch.manual_seed(0)
    B, N, D, H, hd, p, C, K = 2, 5, 40, 2, 20, 4, 3, 12
    x, h, dx, du = randn(B, N, D), randn(B, N, D), randn(B, N, D), randn(B, N, D)
    gate, w, shift, scale, rstd = randn(B, D), randn(D), randn(B, D), randn(B, D), randn(B, N)
    qkv, cos, sin, dq = randn(B, N, 3 * H * hd), randn(N, hd), randn(N, hd), randn(B, H, N, hd)
    img, w1, w2, b2 = randn(B, C, 8, 12), randn(K, C, p, p), randn(D, K, 1, 1), randn(D)
    wo, bo, u = randn(p * p * C, D), randn(p * p * C), randn(B, 4, D)
    noise, t, bias = randn(B, C, 8, 12), torch.rand(B, device=DEVICE), randn(D)
    jf = torch.ops.jitfast
    return [
        (jf.residual_norm, (x, None, None, None, w, None, None, 1e-6, 0, None)),
        (jf.residual_norm, (x, None, None, None, w, shift, scale, 1e-6, 0, torch.bfloat16)),
        (jf.residual_norm, (x, h, gate, None, None, None, None, 1e-6, 0, None)),
        (jf.residual_norm, (x, h, gate, bias, w, shift, scale, 1e-6, 2, None)),
        (jf.residual_norm_backward, (dx, du, x, h, gate, None, w, shift, scale, rstd.abs(), 0)),
        (jf.residual_norm_backward, (None, du[:, 2:], x, h, gate, bias, w, shift, scale,
                                     rstd[:, 2:].abs(), 2)),
        (jf.residual_norm_backward, (None, du, x, None, None, None, w, None, None, rstd.abs(),
                                     0)),
        (jf.swiglu, (randn(B, N, 2 * D), None)),
        (jf.swiglu, (randn(B, N, 2 * D), randn(2 * D))),
        (jf.swiglu_backward, (x, randn(B, N, 2 * D), randn(2 * D))),
        (jf.swiglu_matmul, (randn(B * N, D), randn(2 * 24, D), randn(2 * 24))),
        (jf.swiglu_matmul, (randn(B * N, D), randn(2 * 24, D), None)),
        (jf.swiglu_matmul_backward, (randn(B * N, D), randn(D, 24), randn(B * N, 2 * 24), True)),
        (jf.qk_norm_rope, (qkv, H, randn(hd), randn(hd), cos, sin, 1e-6)),
        (jf.qk_norm_rope_backward, (dq, dq * 2, dq * 3, qkv, randn(3 * H * hd), randn(hd),
                                    randn(hd), cos, sin, 1e-6)),
        (jf.patch_embed, (img, w1, w2, b2, randn(1, 6, D), None, None, 1.0, False)),
        (jf.patch_embed, (img, w1, w2, b2, randn(1, 6, D), noise, t, 2.0, True)),
        (jf.patch_embed_backward, (randn(B, 6, D), img, None, None, 1.0, w1, w2, True)),
        (jf.patch_embed_backward, (randn(B, 6, D), img, noise, t, 2.0, w1, w2, True)),
        (jf.patch_embed_backward, (randn(B, 6, D), img, None, None, 1.0, w1, w2, False)),
        (jf.output_head, (u, wo, bo, p, C)),
        (jf.output_head_v_loss, (randn(B, 4, D), wo, bo, randn(B, C, 8, 8), t, p, 0.05)),
        (jf.residual_norm_dual, (x, h, gate, bias, w, shift, scale, 1e-6, 2, None, dx, du)),
        (jf.residual_norm_dual, (x, None, None, None, w, shift, scale, 1e-6, 0, torch.bfloat16,
                                 dx, None)),
        (jf.residual_norm_dual, (x, h, gate, None, None, None, None, 1e-6, 0, None, dx, du)),
        (jf.qk_norm_rope_dual, (qkv, randn(3 * H * hd), H, randn(hd), randn(hd), cos, sin, 1e-6,
                                randn(B, N, 3 * H * hd))),
        (jf.swiglu_dual, (randn(B, N, 2 * D), None, randn(B, N, 2 * D))),
        (jf.patch_embed_dual, (img, w1, w2, b2, randn(1, 6, D), randn(B, C, 8, 12))),
        (jf.attention_jvp, (dq, dq * 2, dq * 3, dq * 4, dq * 5, dq * 6)),
        (jf.pmf_head_dual, (u, wo, bo, randn(B, C, 8, 8), torch.rand(B, device=DEVICE), u * 2,
                            randn(B, C, 8, 8), randn(B), p, 0.05)),
        (jf.adamw_ema_, (x, dx, randn(B, N, D), randn(B, N, D).abs(),
                         torch.tensor([1e-3, 10.0, 3.0], device=DEVICE), 0.9, 0.95, 1e-8, 0.1,
                         randn(B, N, D), 0.99, None, 0.0, x.to(torch.bfloat16))),
        (jf.output_head_backward, (randn(B, C, 8, 8), u, wo, p)),
        (jf.output_head_velocity, (u, wo, bo, randn(B, C, 8, 8), torch.rand(B, device=DEVICE),
                                   None, p, 0.05)),
        (jf.output_head_velocity, (u, wo, bo, randn(1, C, 8, 8), torch.rand(1, device=DEVICE),
                                   randn(1), p, 0.05)),
        (jf.output_head_step, (u, wo, bo, randn(B, C, 8, 8), torch.rand(1, device=DEVICE), None,
                               torch.rand(1, device=DEVICE), None, None, p, 0.05)),
        (jf.output_head_step, (u, wo, bo, randn(1, C, 8, 8), torch.rand(1, device=DEVICE),
                               randn(1), torch.rand(1, device=DEVICE), randn(1, C, 8, 8),
                               randn(1, C, 8, 8), p, 0.05)),
    ]


OPCHECK_IDS = [f"{op.__name__}-{i}" for i, (op, _) in enumerate(opcheck_cases())]


@pytest.mark.parametrize("case", range(len(OPCHECK_IDS)), ids=OPCHECK_IDS)
def test_opcheck(case):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) checks; the
    forward ops get inputs that require grad, so their backward is exercised too (all but the
    sampler's step, which is inference only, the optimizer's in-place update and attention's
    tangent, which no gradient goes through, and q/k-norm+RoPE's and the SwiGLU matmul's
    forwards, whose autograd is a Function's: test_qk_norm_rope_v_is_a_view_of_qkv, the
    swiglu_mlp cases of test_kernel_matches_reference)."""
    op, args = opcheck_cases()[case]
    if not op.__name__.endswith(("_backward", "_", "_jvp")) and \
            op.__name__ not in ("output_head_step", "qk_norm_rope", "swiglu_matmul"):
        args = tuple(a.requires_grad_() if torch.is_tensor(a) and a.numel() else a for a in args)
    torch.library.opcheck(op, args)


def test_every_kernel_has_its_own_name():
    """The profiler aggregates GPU time by kernel name (docs/design.md §4): each Triton kernel is
    named after its module's op and its pass, and no two share a name."""
    import triton

    found = {}
    for module in ("norm", "output_head", "patch_embed", "qk_norm_rope", "swiglu",
                   "swiglu_matmul", "v_loss", "adamw_ema", "attention_jvp"):
        try:
            mod = importlib.import_module(f"jitfast.kernels.{module}")
        except ModuleNotFoundError:
            continue
        for value in vars(mod).values():
            if not isinstance(value, triton.runtime.KernelInterface):
                continue
            fn = value
            while not callable(fn) or hasattr(fn, "fn"):  # autotuner > jit/interpreter > def
                fn = fn.fn
            if fn.__module__ == mod.__name__:
                found.setdefault(fn.__name__, []).append(module)
    assert found, "no Triton kernels found"
    kernels_ = [name for name in found if name.endswith(("_fwd", "_bwd"))]
    assert len(kernels_) >= 10, sorted(found)
    assert all(len(modules) == 1 for modules in found.values()), found
    assert not {"_forward", "_backward"} & set(found)


def test_qk_norm_rope_writes_bshd_and_takes_bshd_grads():
    """q, k are (B, H, N, hd) laid out (B, N, H, hd), and v too with its rows where qkv has them
    (3·D apart, test_qk_norm_rope_v_is_a_view_of_qkv): attention reads that layout natively and
    writes its output so, and the model's transpose back to (B, N, D) is then a view. The grads
    attention returns in that layout reach the backward as they are, and match the reference."""
    B, N, H, hd = 2, 7, 3, 8
    qkv = randn(B, N, 3 * H * hd).requires_grad_()
    wq, wk, cos, sin = randn(hd), randn(hd), randn(N, hd), randn(N, hd)
    q, k, v = kernels.qk_norm_rope(qkv, H, wq, wk, cos, sin)
    for out in (q, k):
        assert out.shape == (B, H, N, hd) and out.transpose(1, 2).is_contiguous()
    assert v.shape == (B, H, N, hd) and v.stride() == (N * 3 * H * hd, hd, 3 * H * hd, 1)
    grads = [randn(B, N, H, hd).transpose(1, 2) for _ in range(3)]  # BSHD grads
    (got,) = torch.autograd.grad((q, k, v), qkv, grads)
    ref_qkv = qkv.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(ref.qk_norm_rope(ref_qkv, H, wq, wk, cos, sin), ref_qkv, grads)
    assert rel_err(got, want) < 1e-5


def test_modulation_chunks_are_read_in_place():
    """The per-sample gate, shift and scale are read through their row stride: no copy of the
    chunks of the block's modulation, forward or backward (6 small kernels per block and
    network evaluation, a fifth of the batch-1 sampler's GPU time when they were copied)."""
    torch.manual_seed(0)
    x, h, modulation, w = randn(2, 5, 40), randn(2, 5, 40), randn(2, 120), randn(40)
    modulation.requires_grad_()
    with torch.profiler.profile() as prof:
        gate, shift, scale = modulation.chunk(3, dim=-1)
        x_new, u = kernels.gated_residual_rms_norm_modulate(x, h, gate, w, shift, scale)
        torch.autograd.backward([x_new, u], [randn(2, 5, 40), randn(2, 5, 40)])
    assert modulation.grad is not None
    assert [e.name for e in prof.events() if e.name == "aten::clone"] == []


@pytest.mark.parametrize("emas,copy,grad_dtype", [(2, True, torch.bfloat16),
                                                  (1, False, torch.float32),
                                                  (0, True, torch.float32)])
def test_adamw_ema_matches_reference(emas, copy, grad_dtype):
    """The optimizer's one-pass update (AdamW, the EMA sets, the compute copy) against its
    PyTorch reference, over 3 steps of a weight whose size is not a multiple of the block."""
    torch.manual_seed(0)
    n = 2 * kernels.adamw_ema.BLOCK + 37
    start = [randn(n) for _ in range(3 + emas)]
    start[2] = start[2].abs()  # exp_avg_sq
    states = [[t.clone() for t in start] for _ in range(2)]
    copies = [torch.empty(n, dtype=torch.bfloat16, device=DEVICE) if copy else None
              for _ in range(2)]
    for step in range(1, 4):
        grad = randn(n).to(grad_dtype)
        scalars = torch.tensor([1e-2, 1 / (1 - 0.9 ** step), (1 - 0.95 ** step) ** -0.5],
                               device=DEVICE)
        for module, state, c in zip((ref, kernels.adamw_ema), states, copies):
            param, exp_avg, exp_avg_sq, *ema = state
            module.adamw_ema_(param, grad, exp_avg, exp_avg_sq, scalars, (0.9, 0.95), 1e-8, 0.1,
                              ema, (0.99, 0.9)[:emas], c)
    for i, (got, want) in enumerate(zip(states[1], states[0])):
        assert rel_err(got, want) < 1e-6, f"tensor {i}: {rel_err(got, want):.2e}"
    if copy:  # rounded to nearest even on the GPU; the CPU's interpreter truncates
        want = states[1][0].to(torch.bfloat16) if DEVICE == "cuda" else \
            (states[1][0].view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        assert torch.equal(copies[1], want)
