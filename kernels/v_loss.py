"""JiT's training loss on the output head: mean((v̂ - v)²) for the x-prediction x̂ = u·Wᵀ + b of
clean images x at times t, where v̂ - v = (x̂ - x)/max(1 - t, t_eps) (the noisy state cancels).

The head's matmul is cuBLAS's (x̂ in u's dtype, as autocast's Linear gives it); one Triton
epilogue then reads x̂ in the matmul's (tokens × p²·C) layout with the clean image gathered into
it, and writes the loss's partial sums, its gradient g = dloss/dx̂ in the same layout (u's dtype:
the operand of both backward matmuls) and g's column sums (the bias grad). The backward is then
two cuBLAS matmuls, du = g·W and dW = gᵀ·u, scaled by the loss's incoming gradient: x̂, the
velocity error and the unpatchified image never reach memory.

Program (columns, chunk) takes a contiguous run of row tiles of BLOCK_M tokens by BLOCK_N
columns and sums the loss and g over its rows into partial rows, summed afterwards.
"""
import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autocast_operands, autotune, image_geometry, patch_offsets,
                      reduction_programs, row_bucket, use_kernel)

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
           for m, n, w in ((32, 128, 4), (16, 256, 4), (64, 64, 4), (32, 256, 8))]


@autotune(CONFIGS, key=["P"])
@triton.jit
def _output_head_loss_fwd(OUT, BIAS, X, T, G, LOSS_PART, DB_PART, M, P, t_eps, scale, n_tok,
                          grid_w, p, channels, s_b, s_c, s_h, s_w, ROW_BUCKET,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (columns, chunk): loss partial sums (scaled by `scale`, 1/numel) and g's column
    sums of its rows to row `chunk` of LOSS_PART and DB_PART."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tiles = tl.cdiv(M, BLOCK_M)
    chunk, chunks = tl.program_id(1).to(tl.int64), tl.num_programs(1)
    bias = tl.load(BIAS + cols, mask=cols < P, other=0.0).to(tl.float32)
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in tl.range(chunk * tiles // chunks, (chunk + 1) * tiles // chunks, num_stages=2):
        tok = (tile * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]).to(tl.int64)
        mask = (tok < M) & (cols < P)
        x_hat = tl.load(OUT + tok * P + cols, mask=mask, other=0.0).to(tl.float32) + bias
        offs = patch_offsets(tok, cols, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w, True)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + tok // n_tok, mask=tok < M, other=0.0).to(tl.float32)
        denominator = tl.maximum(1.0 - t, t_eps)
        error = tl.where(mask, (x_hat - x) / denominator, 0.0)
        loss += tl.sum(error * error, axis=0)
        g = 2.0 * scale * error / denominator
        tl.store(G + tok * P + cols, g, mask=mask)
        db += tl.sum(g, axis=0)
    lanes = tl.reshape(cols, [BLOCK_N])
    tl.store(LOSS_PART + chunk * P + lanes, loss * scale, mask=lanes < P)
    tl.store(DB_PART + chunk * P + lanes, db, mask=lanes < P)


@torch.library.custom_op("jitfast::output_head_v_loss", mutates_args=())
def output_head_v_loss_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          x: torch.Tensor, t: torch.Tensor, p: int, t_eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, g, db): the v-loss (a float32 scalar), its gradient with respect to x̂ in the
    (tokens × p²·C) layout, in u's dtype, and the bias's gradient (float32)."""
    D, P = u.shape[-1], weight.shape[0]
    x_hat = u.reshape(-1, D) @ weight.t()
    x, t = x.contiguous(), t.contiguous()
    M = x_hat.shape[0]
    g = torch.empty_like(x_hat)
    chunks = reduction_programs(triton.cdiv(P, CONFIGS[0].kwargs["BLOCK_N"]), M, u.device)
    loss_part = u.new_empty(chunks, P, dtype=torch.float32)
    db_part = torch.empty_like(loss_part)
    _output_head_loss_fwd[lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), chunks)](
        x_hat, bias, x, t, g, loss_part, db_part, M, P, t_eps, 1.0 / x.numel(),
        *image_geometry(x, p), ROW_BUCKET=row_bucket(M))
    return loss_part.sum(), g, db_part.sum(0)


@output_head_v_loss_op.register_fake
def _(u, weight, bias, x, t, p, t_eps):
    M = u.numel() // u.shape[-1]
    P = weight.shape[0]
    return (u.new_empty((), dtype=torch.float32), u.new_empty(M, P),
            u.new_empty(P, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    u, weight, bias, *_ = inputs
    _, g, db = output
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(g, db)
    ctx.set_materialize_grads(False)  # no zero-filled grads for g and db
    ctx.save_for_backward(u, weight, g, db)


def _backward_fn(ctx, dloss, _g, _db):
    """du = g·(dloss·W), dW = dloss·gᵀu, db = dloss·Σg: the loss's incoming gradient scales the
    small operands, not the (tokens × features) ones."""
    u, weight, g, db = ctx.saved_tensors
    du = (g @ (weight * dloss).to(weight.dtype)).view(u.shape)
    dweight = (g.t() @ u.reshape(-1, u.shape[-1])) * dloss
    dbias = db * dloss
    return (du, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None, None, None, None)


output_head_v_loss_op.register_autograd(_backward_fn, setup_context=_setup_context)


def output_head_v_loss(u, weight, bias, x, t, p, t_eps=0.05):
    """JiT's training loss fused into the head: mean((v̂ - v)²) for the x-prediction
    x̂ = u·Wᵀ + b (unpatchified) of clean images x (B, C, H, W) at times t (B,), u (B, N, D);
    under autocast the matmul runs in its dtype, like F.linear."""
    if not use_kernel(u):
        return _v_loss_reference(u, weight, bias, x, t, p, t_eps)
    return output_head_v_loss_op(*autocast_operands(u, weight, bias), x, t, p, t_eps)[0]


def _v_loss_reference(u, weight, bias, x, t, p, t_eps):
    """The PyTorch composition of what output_head_v_loss_op computes, for CPU tensors."""
    image = ref.output_head(u, weight, bias, p, x.shape[1]).float()
    denominator = (1 - t.float()).clamp_min(t_eps).view(-1, 1, 1, 1)
    return ((image - x) / denominator).square().mean()
