"""Output head: the final Linear (D → p²·C) with the unpatchify scatter in its epilogue, writing
the NCHW image directly (a patch's output vector is laid out (p, q, c)).

Velocity epilogues replace the store of x̂ by (x̂ - ref)/max(1 - t, t_eps) of the ODE state ref:
the sampler's velocity, classifier-free guided in the same pass (``output_head_velocity``), and
with the sampler's Euler or Heun update of the float32 state in the same pass
(``output_head_step``). (Training's v-loss, over a whole batch, runs cuBLAS's matmul and an
epilogue of its own: ``v_loss``.)

The backward kernel gathers dout's patch vectors straight from NCHW for du = dout·W; the weight
and bias grads, reductions over all tokens, go to cuBLAS on the gathered (M, p²·C) matrix.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref_ops
from jitfast.functional.ode import ode_update

from ._common import (autocast_operands, autotune, dot_precision, empty, image_geometry,
                      patch_offsets, row_bucket, tile_grid, use_kernel, weight_grad)

# The sampler's one-element time, guidance and step tensors: slices of a run's time grid, 16-byte
# aligned only at every fourth index. Specialising on their alignment would compile new variants
# mid-trajectory, inside a CUDA-graph capture, where compiling is not allowed.
SCALARS = ("T", "CFG", "DT")
# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps). The sampler's evaluations at batch 1 (256 token rows,
# each with its unconditional twin when guided, by P = 768 columns) fill few programs with the
# larger tiles (96 at 32 × 64): the smaller, K-deeper ones give 192 programs and half or a
# quarter of the K loop's steps. The autotune key's row bucket picks per batch size.
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w)
           for m, k, n, w in ((32, 32, 64, 4), (64, 32, 64, 4), (64, 32, 128, 8),
                              (16, 64, 64, 4), (16, 128, 64, 4), (32, 64, 32, 4))]


@triton.jit
def gather_matmul(IMG, W, tok, n_rows, out, n_out, n_cols, s_wj, s_wo,
                  n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, CHANNEL_LAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr,
                  PRECISION: tl.constexpr):
    """acc[m, o] = sum_j patch(tok[m])[j] · W[j·s_wj + out[o]·s_wo], accumulated in float32.

    The patch vectors (n_cols long) are gathered straight from the NCHW image; tok (BLOCK_M, 1)
    is valid below n_rows, out (1, BLOCK_O) below n_out.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for j0 in range(0, n_cols, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        img = tl.load(IMG + patch_offsets(tok, j[None, :], n_tok, grid_w, p, channels,
                                          s_b, s_c, s_h, s_w, CHANNEL_LAST),
                      mask=(tok < n_rows) & (j[None, :] < n_cols), other=0.0)
        w = tl.load(W + j[:, None] * s_wj + out * s_wo,
                    mask=(j[:, None] < n_cols) & (out < n_out), other=0.0)
        acc += tl.dot(img.to(W.dtype.element_ty), w, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_tile(U, W, BIAS, tok, cols, M, D, P, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ADD_BIAS: tl.constexpr = True):
    """U[tok] · W[cols]ᵀ + BIAS[cols] (without it unless ADD_BIAS) in float32, for token rows
    tok < M and columns cols < P."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(U + tok.to(tl.int64) * D + kk[None, :],
                    mask=(tok < M) & (kk[None, :] < D), other=0.0)
        w = tl.load(W + cols * D + kk[:, None], mask=(kk[:, None] < D) & (cols < P), other=0.0)
        acc += tl.dot(u.to(W.dtype.element_ty), w, input_precision=PRECISION)
    if ADD_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < P, other=0.0).to(tl.float32)
    return acc


@autotune(CONFIGS, key=["D", "P", "VELOCITY", "GUIDED", "UPDATE", "DUAL"])
@triton.jit(do_not_specialize_on_alignment=SCALARS)
def _output_head_fwd(U, W, BIAS, OUT, REF, T, CFG, t_eps, DT, V_PREV, BASE, STATE, TU, TREF, TT,
                     TOUT, M, D, P, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                     VELOCITY: tl.constexpr, GUIDED: tl.constexpr, UPDATE: tl.constexpr,
                     DUAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT = x̂ = head(U) for the M rows of U; with VELOCITY, OUT = v = (x̂ - REF)/max(1 - T,
    t_eps); with GUIDED too, U has M conditional rows then M unconditional ones, combined as
    v_u + CFG·(v_c - v_u). UPDATE also writes the ODE state STATE: "euler" REF + DT·v;
    "heun" (the second evaluation, at REF = BASE + DT·V_PREV) BASE + DT·(V_PREV + v)/2, and
    then OUT, which nothing needs, is not written. DUAL (pMF's average velocity and its JVP):
    OUT = u = (REF - x̂)/clip(T, t_eps, 1) at pMF's time T, and TOUT its tangent along the
    tangents TU of U, TREF of REF and TT of T: (TREF - x̂')/c - u·c'(T)·TT/c, x̂' = TU·Wᵀ."""
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    out = _linear_tile(U, W, BIAS, tok, cols, M, D, P, PRECISION, BLOCK_M, BLOCK_K, BLOCK_N)
    offs = patch_offsets(tok, cols, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, True)
    mask = (tok < M) & (cols < P)
    if DUAL:
        t = tl.load(T + tok // n_tok, mask=tok < M, other=1.0).to(tl.float32)
        c = tl.minimum(tl.maximum(t, t_eps), 1.0)
        inside = ((t > t_eps) & (t < 1.0)).to(tl.float32)
        u = (tl.load(REF + offs, mask=mask, other=0.0).to(tl.float32) - out) / c
        t_x_hat = _linear_tile(TU, W, BIAS, tok, cols, M, D, P, PRECISION, BLOCK_M, BLOCK_K,
                               BLOCK_N, False)
        t_ref = tl.load(TREF + offs, mask=mask, other=0.0).to(tl.float32)
        tt = tl.load(TT + tok // n_tok, mask=tok < M, other=0.0).to(tl.float32)
        tl.store(TOUT + offs, (t_ref - t_x_hat) / c - u * inside * tt / c, mask=mask)
        out = u
    if VELOCITY:
        t = tl.load(T + tok // n_tok, mask=tok < M, other=0.0).to(tl.float32)
        ref = tl.load(REF + offs, mask=mask, other=0.0).to(tl.float32)
        denominator = tl.maximum(1.0 - t, t_eps)
        out = (out - ref) / denominator
        if GUIDED:
            uncond = _linear_tile(U + M * D, W, BIAS, tok, cols, M, D, P, PRECISION, BLOCK_M,
                                  BLOCK_K, BLOCK_N)
            uncond = (uncond - ref) / denominator
            out = uncond + tl.load(CFG).to(tl.float32) * (out - uncond)
        if UPDATE == "euler":
            tl.store(STATE + offs, ref + tl.load(DT) * out, mask=mask)
        if UPDATE == "heun":
            mean = 0.5 * (tl.load(V_PREV + offs, mask=mask, other=0.0) + out)
            tl.store(STATE + offs, tl.load(BASE + offs, mask=mask, other=0.0) + tl.load(DT) * mean,
                     mask=mask)
    if UPDATE != "heun":
        tl.store(OUT + offs, out, mask=mask)


@autotune(CONFIGS, key=["D", "P"])
@triton.jit
def _output_head_bwd(DOUT, W, DU, M, D, P, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w,
                     ROW_BUCKET, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """du = gather(dout) · W, tiles of BLOCK_M tokens × BLOCK_N hidden, over P in BLOCK_K."""
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    dd = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    du = gather_matmul(DOUT, W, tok, M, dd, D, P, D, 1,
                       n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, True,
                       BLOCK_M, BLOCK_K, BLOCK_N, PRECISION)
    tl.store(DU + tok.to(tl.int64) * D + dd, du, mask=(tok < M) & (dd < D))


def _image_shape(u, p, channels, guided=False):
    """NCHW shape of the head's output; a guided batch stacks two halves into one image batch."""
    B, N, _ = u.shape
    side = int(N ** 0.5) * p
    return B // 2 if guided else B, channels, side, side


def _head(u, weight, bias, p, channels, ref=None, t=None, cfg=None, t_eps=0.0, dt=None,
          v_prev=None, base=None, dual=None):
    """Launch the forward: x̂, or the velocity (float32) if ref is given, as NCHW; with dt also the
    next ODE state; with dual = (tangent tokens, tangent of ref, tangent of t), pMF's u at ref and
    t and its tangent (see _output_head_fwd). Returns (x̂, the velocity or u — empty for Heun's
    second evaluation, the state, u's tangent or None)."""
    u, weight, bias = u.contiguous(), weight.contiguous(), bias.contiguous()
    D, P = u.shape[-1], weight.shape[0]
    shape = _image_shape(u, p, channels, guided=cfg is not None)
    M = shape[0] * u.shape[1]
    update = "" if dt is None else "euler" if v_prev is None else "heun"
    out = u.new_empty(0 if update == "heun" else shape,
                      dtype=u.dtype if ref is None else torch.float32)
    state = None if dt is None else u.new_empty(shape, dtype=torch.float32)
    if ref is not None:
        ref, t = ref.contiguous(), t.expand(shape[0]).contiguous()
    if update == "heun":
        v_prev, base = v_prev.contiguous(), base.contiguous()
    tangents = (None, None, None, None)
    if dual is not None:
        tangents = (*(x.contiguous() for x in dual), torch.empty_like(out))
    _output_head_fwd[tile_grid(BLOCK_M=M, BLOCK_N=P)](
        u, weight, bias, out, ref, t, cfg, t_eps, dt, v_prev, base, state, *tangents, M, D, P,
        *image_geometry(out if ref is None else ref, p), ROW_BUCKET=row_bucket(M),
        VELOCITY=ref is not None and dual is None, GUIDED=cfg is not None, UPDATE=update,
        DUAL=dual is not None, PRECISION=dot_precision(weight.dtype))
    return out, state if dual is None else tangents[-1]


@torch.library.custom_op("jitfast::output_head", mutates_args=())
def output_head_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int,
                   channels: int) -> torch.Tensor:
    return _head(u, weight, bias, p, channels)[0]


@output_head_op.register_fake
def _(u, weight, bias, p, channels):
    return u.new_empty(_image_shape(u, p, channels))


@torch.library.custom_op("jitfast::output_head_velocity", mutates_args=())
def output_head_velocity_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            ref: torch.Tensor, t: torch.Tensor, cfg: Optional[torch.Tensor],
                            p: int, t_eps: float) -> torch.Tensor:
    """(x̂ - ref)/max(1 - t, t_eps) in float32 for x̂ = head(u), the x-prediction; t is (B,) or
    (1,). With cfg (a (1,) tensor), u holds the conditional then the unconditional batch and the
    two velocities are combined as v_u + cfg·(v_c - v_u)."""
    return _head(u, weight, bias, p, ref.shape[1], ref, t, cfg, t_eps)[0]


@output_head_velocity_op.register_fake
def _(u, weight, bias, ref, t, cfg, p, t_eps):
    return torch.empty_like(ref, dtype=torch.float32)


@torch.library.custom_op("jitfast::output_head_step", mutates_args=())
def output_head_step_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        z: torch.Tensor, t: torch.Tensor, cfg: Optional[torch.Tensor],
                        dt: torch.Tensor, v_prev: Optional[torch.Tensor],
                        base: Optional[torch.Tensor], p: int,
                        t_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation of the sampler: the velocity v of output_head_velocity_op at the float32
    state z, and the state it leads to, as ``jitfast.functional.ode.ode_update``: (z + dt·v, v), or
    given Heun's first velocity v_prev from state base, (base + dt·(v_prev + v)/2, empty).
    Inference only (no autograd)."""
    v, state = _head(u, weight, bias, p, z.shape[1], z, t, cfg, t_eps, dt, v_prev, base)
    return state, v


@output_head_step_op.register_fake
def _(u, weight, bias, z, t, cfg, dt, v_prev, base, p, t_eps):
    state = torch.empty_like(z, dtype=torch.float32)
    return state, torch.empty_like(state) if v_prev is None else empty(state)


@torch.library.custom_op("jitfast::pmf_head_dual", mutates_args=())
def pmf_head_dual_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor,
                     t: torch.Tensor, tu: torch.Tensor, tz: torch.Tensor, tt: torch.Tensor,
                     p: int, t_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pMF's head and its JVP in one pass: the average velocity (z - x̂)/clip(t, t_min, 1) of
    x̂ = head(u) (float32, NCHW) and its tangent along (tu, tz, tt); gradients through the
    velocity only."""
    return _head(u, weight, bias, p, z.shape[1], z, t, t_eps=t_min, dual=(tu, tz, tt))


@pmf_head_dual_op.register_fake
def _(u, weight, bias, z, t, tu, tz, tt, p, t_min):
    return (torch.empty_like(z, dtype=torch.float32), torch.empty_like(z, dtype=torch.float32))


@torch.library.custom_op("jitfast::output_head_backward", mutates_args=())
def output_head_backward(dout: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                         p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (du, dweight, dbias)."""
    dout, u, weight = dout.contiguous(), u.contiguous(), weight.contiguous()
    M, D, P = u.numel() // u.shape[-1], u.shape[-1], weight.shape[0]
    du = torch.empty_like(u)
    _output_head_bwd[tile_grid(BLOCK_M=M, BLOCK_N=D)](dout, weight, du, M, D, P,
                                                      *image_geometry(dout, p),
                                                      ROW_BUCKET=row_bucket(M),
                                                      PRECISION=dot_precision(weight.dtype))
    B, C, H, W = dout.shape
    patches = dout.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(M, P)
    dweight = weight_grad(patches.t(), u.reshape(M, D), weight.dtype)
    return du, dweight, patches.sum(0).to(weight.dtype)


@output_head_backward.register_fake
def _(dout, u, weight, p):
    return torch.empty_like(u), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    u, weight, _, p, *_ = inputs
    ctx.p = p
    ctx.save_for_backward(u, weight)


def _backward_fn(ctx, dout):
    du, dweight, dbias = output_head_backward(dout, *ctx.saved_tensors, ctx.p)
    return du, dweight, dbias, None, None


output_head_op.register_autograd(_backward_fn, setup_context=_setup_context)


def _velocity_setup_context(ctx, inputs, output):
    u, weight, _, ref, t, cfg, p, t_eps = inputs
    ctx.p = p
    ctx.save_for_backward(u, weight, (1 - t).clamp_min(t_eps), cfg)


def _velocity_backward(ctx, dv):
    """dv/dx̂ = 1/max(1 - t, t_eps), split cfg : 1 - cfg between the conditional and the
    unconditional rows when guided; ref, t and cfg get no grad (data, not parameters)."""
    u, weight, denominator, cfg = ctx.saved_tensors
    dout = dv / denominator.view(-1, 1, 1, 1)
    if cfg is not None:
        dout = torch.cat([cfg * dout, (1 - cfg) * dout])
    du, dweight, dbias = output_head_backward(dout.to(u.dtype), u, weight, ctx.p)
    return du, dweight, dbias, None, None, None, None, None


output_head_velocity_op.register_autograd(_velocity_backward,
                                          setup_context=_velocity_setup_context)


def _pmf_setup_context(ctx, inputs, output):
    u, weight, _, _, t, _, _, _, p, t_min = inputs
    ctx.p = p
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the tangent gets no grad, not even a zero one
    inside = (t > t_min) & (t < 1.0)
    ctx.save_for_backward(u, weight, t.clamp(t_min, 1.0), inside,
                          output[0] if ctx.needs_input_grad[4] else None)


def _pmf_backward(ctx, grad, _):
    """d/dx̂ = -1/c, d/dz = 1/c, d/dt = -u·c'(t)/c for c = clip(t, t_min, 1); the tangents get
    no grad."""
    u, weight, c, inside, velocity = ctx.saved_tensors
    c = c.view(-1, 1, 1, 1)
    du, dweight, dbias = output_head_backward((-grad / c).to(u.dtype), u, weight, ctx.p)
    dz = grad / c if ctx.needs_input_grad[3] else None
    dt = None
    if velocity is not None:
        dt = -(grad * velocity).sum((1, 2, 3)) * inside / c.view(-1)
    return du, dweight, dbias, dz, dt, None, None, None, None, None


pmf_head_dual_op.register_autograd(_pmf_backward, setup_context=_pmf_setup_context)


def output_head(x, weight, bias, p, channels):
    """``ops.output_head``; under autocast it runs in autocast's dtype, like F.linear."""
    if not use_kernel(x):
        return ref_ops.output_head(x, weight, bias, p, channels)
    return output_head_op(*autocast_operands(x, weight, bias), p, channels)


def _scalar_tensor(value, device):
    """A python number as the (1,) float32 tensor a kernel reads; tensors and None pass."""
    if value is None or torch.is_tensor(value):
        return value
    return torch.full((1,), value, dtype=torch.float32, device=device)


def output_head_velocity(u, weight, bias, z, t, p, t_eps=0.05, cfg=None):
    """The sampler's velocity (x̂ - z)/max(1 - t, t_eps) of the x-prediction x̂ = head(u) at the
    float32 state z (B, C, H, W), time t ((B,) or (1,) tensor); with cfg, u is the batched
    conditional + unconditional pass (2B rows) and the result is v_u + cfg·(v_c - v_u).
    x̂ is never written."""
    cfg = _scalar_tensor(cfg, z.device)
    if not use_kernel(u):
        return _velocity_reference(u, weight, bias, z, t, p, t_eps, cfg)
    u, weight, bias = autocast_operands(u, weight, bias)
    return output_head_velocity_op(u, weight, bias, z, t, cfg, p, t_eps)


def output_head_step(u, weight, bias, z, t, dt, p, t_eps=0.05, cfg=None, v_prev=None,
                     base=None):
    """``output_head_velocity`` and the sampler's state update in one pass: returns
    ``jitfast.functional.ode.ode_update(v, z, dt, v_prev, base)`` for the velocity v at state z,
    with v left empty after Heun's second evaluation (v_prev given), which needs none. dt is a (1,)
    tensor or a float."""
    cfg, dt = _scalar_tensor(cfg, z.device), _scalar_tensor(dt, z.device)
    if not use_kernel(u):
        v = output_head_velocity(u, weight, bias, z, t, p, t_eps, cfg)
        return ode_update(v, z, dt, v_prev, base)
    u, weight, bias = autocast_operands(u, weight, bias)
    return output_head_step_op(u, weight, bias, z, t, cfg, dt, v_prev, base, p, t_eps)


def _velocity_reference(u, weight, bias, ref, t, p, t_eps, cfg):
    """The PyTorch composition of what output_head_velocity_op computes, for CPU tensors."""
    image = ref_ops.output_head(u, weight, bias, p, ref.shape[1]).float()
    denominator = (1 - t.float()).clamp_min(t_eps).view(-1, 1, 1, 1)
    if cfg is None:
        return (image - ref) / denominator
    cond, uncond = ((half - ref) / denominator for half in image.chunk(2))
    return uncond + cfg * (cond - uncond)


def pmf_head_dual(u, weight, bias, z, t, tu, tz, tt, p, t_min=0.05):
    """pMF's average velocity (z - x̂)/clip(t, t_min, 1) of the head's x̂ = head(u), float32
    NCHW, and its tangent along the tangents tu of u, tz of z and tt (B,) of t, in one pass
    (``pmf_head_dual_op``); under autocast the matmuls run in its dtype."""
    if not use_kernel(u):
        return ref_ops.pmf_head_dual(u, weight, bias, z, t, tu, tz, tt, p, t_min)
    u, weight, bias, tu = autocast_operands(u, weight, bias, tu)
    return pmf_head_dual_op(u, weight, bias, z, t, tu, tz, tt, p, t_min)

