"""q/k RMSNorm + 2-D RoPE: from the qkv Linear output (B, N, 3·D) to q, k, v as contiguous
(B, H, N, hd), the layout attention wants. One program per token handles all heads as an
(H, hd) tile; RoPE rotates interleaved pairs, so each lane also reads its partner lane d ^ 1:

    out[d] = y[d]·cos[d] + s[d]·y[d ^ 1]·sin[d],   s = -1 on even d, +1 on odd d,

with y = w·x·rstd per head, all in float32. q and k are written in qkv's dtype (the reference
promotes them to the tables' dtype; attention casts them back anyway). The backward recomputes
rstd from qkv and reduces the q/k norm weight grads over tokens in per-chunk partial sums.
"""
import torch
import triton
import triton.language as tl

from jitfast import ops as ref

from ._common import block, row_split, use_kernel


@triton.jit
def _lanes(H, hd, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    """Head and lane indices of the tile, the partner lanes, the rotation sign and the mask."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    lanes = tl.arange(0, BLOCK_HD)[None, :]
    sign = tl.where(lanes % 2 == 0, -1.0, 1.0)
    return heads, lanes, lanes ^ 1, sign, (heads < H) & (lanes < hd)


@triton.jit
def _normalized(SRC, heads, lanes, mask, hd, eps):
    """(x̂, rstd) of the tile of one token's q or k at SRC."""
    x = tl.load(SRC + heads * hd + lanes, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / hd + eps)[:, None]
    return x * rstd, rstd


@triton.jit
def _norm_rope(SRC, W, OUT, dst, cos, sin, heads, lanes, pairs, sign, mask, hd, eps):
    """Normalise and rotate one token's q (or k) tile at SRC into OUT + dst."""
    x_hat, rstd = _normalized(SRC, heads, lanes, mask, hd, eps)
    partner = tl.load(SRC + heads * hd + pairs, mask=mask, other=0.0).to(tl.float32)
    y = x_hat * tl.load(W + lanes, mask=lanes < hd, other=0.0).to(tl.float32)
    y_pair = partner * rstd * tl.load(W + pairs, mask=lanes < hd, other=0.0).to(tl.float32)
    tl.store(OUT + dst + lanes, y * cos + sign * y_pair * sin, mask=mask)


@triton.jit
def _norm_rope_backward(SRC, W, DOUT, DSRC, dst, cos, sin_pair, heads, lanes, pairs, sign, mask,
                        hd, eps):
    """Write the grad of one token's q (or k) tile to DSRC; return its norm weight grad."""
    x_hat, rstd = _normalized(SRC, heads, lanes, mask, hd, eps)
    dout = tl.load(DOUT + dst + lanes, mask=mask, other=0.0).to(tl.float32)
    dout_pair = tl.load(DOUT + dst + pairs, mask=mask, other=0.0).to(tl.float32)
    dy = dout * cos - sign * dout_pair * sin_pair
    dx_hat = dy * tl.load(W + lanes, mask=lanes < hd, other=0.0).to(tl.float32)
    dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / hd)[:, None])
    tl.store(DSRC + heads * hd + lanes, dx, mask=mask)
    return tl.sum(dy * x_hat, axis=0)


@triton.jit
def _qk_norm_rope_fwd(QKV, WQ, WK, COS, SIN, Q, K, V, n_tok, H, hd, eps,
                      BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = row % n_tok
    heads, lanes, pairs, sign, mask = _lanes(H, hd, BLOCK_H, BLOCK_HD)
    D = H * hd
    src = QKV + row * 3 * D
    dst = (row // n_tok) * D * n_tok + heads * n_tok * hd + t * hd
    cos = tl.load(COS + t * hd + lanes, mask=lanes < hd, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * hd + lanes, mask=lanes < hd, other=0.0).to(tl.float32)
    _norm_rope(src, WQ, Q, dst, cos, sin, heads, lanes, pairs, sign, mask, hd, eps)
    _norm_rope(src + D, WK, K, dst, cos, sin, heads, lanes, pairs, sign, mask, hd, eps)
    v = tl.load(src + 2 * D + heads * hd + lanes, mask=mask)
    tl.store(V + dst + lanes, v, mask=mask)


@triton.jit
def _qk_norm_rope_bwd(DQ, DK, DV, QKV, WQ, WK, COS, SIN, DQKV, DW_PART, n_tok, H, hd, eps,
                      rows_per_chunk, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    """Program (sample, chunk) handles rows_per_chunk tokens of one sample; it writes its partial
    sums of the q and k norm weight grads to DW_PART[0 or 1, sample, chunk]."""
    sample = tl.program_id(0).to(tl.int64)
    part = sample * tl.num_programs(1) + tl.program_id(1)
    start = tl.program_id(1) * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_tok)
    heads, lanes, pairs, sign, mask = _lanes(H, hd, BLOCK_H, BLOCK_HD)
    D = H * hd
    dw_q = tl.zeros([BLOCK_HD], dtype=tl.float32)
    dw_k = tl.zeros([BLOCK_HD], dtype=tl.float32)
    for t in range(start, end):
        row = (sample * n_tok + t) * 3 * D
        dst = sample * D * n_tok + heads * n_tok * hd + t * hd
        cos = tl.load(COS + t * hd + lanes, mask=lanes < hd, other=0.0).to(tl.float32)
        sin_pair = tl.load(SIN + t * hd + pairs, mask=lanes < hd, other=0.0).to(tl.float32)
        dw_q += _norm_rope_backward(QKV + row, WQ, DQ, DQKV + row, dst, cos, sin_pair,
                                    heads, lanes, pairs, sign, mask, hd, eps)
        dw_k += _norm_rope_backward(QKV + row + D, WK, DK, DQKV + row + D, dst, cos, sin_pair,
                                    heads, lanes, pairs, sign, mask, hd, eps)
        dv = tl.load(DV + dst + lanes, mask=mask)
        tl.store(DQKV + row + 2 * D + heads * hd + lanes, dv, mask=mask)
    lane = tl.arange(0, BLOCK_HD)
    n_parts = tl.num_programs(0) * tl.num_programs(1)
    tl.store(DW_PART + part * hd + lane, dw_q, mask=lane < hd)
    tl.store(DW_PART + (n_parts + part) * hd + lane, dw_k, mask=lane < hd)


def _blocks(H, hd):
    return dict(BLOCK_H=block(H, 1), BLOCK_HD=block(hd, 2))


@torch.library.custom_op("jitfast::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(qkv: torch.Tensor, num_heads: int, q_weight: torch.Tensor,
                    k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    B, N, D3 = qkv.shape
    hd = D3 // 3 // num_heads
    q, k, v = (qkv.new_empty(B, num_heads, N, hd) for _ in range(3))
    _qk_norm_rope_fwd[(B * N,)](qkv, q_weight, k_weight, cos, sin, q, k, v, N, num_heads, hd, eps,
                       **_blocks(num_heads, hd))
    return q, k, v


@qk_norm_rope_op.register_fake
def _(qkv, num_heads, q_weight, k_weight, cos, sin, eps):
    B, N, D3 = qkv.shape
    return tuple(qkv.new_empty(B, num_heads, N, D3 // 3 // num_heads) for _ in range(3))


@torch.library.custom_op("jitfast::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                          qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (dqkv, dq_weight, dk_weight)."""
    dq, dk, dv, qkv = dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, H, N, hd = dq.shape
    chunks, per_chunk = row_split(B, N, qkv.device)
    part = qkv.new_empty(2, B, chunks, hd, dtype=torch.float32)
    dqkv = torch.empty_like(qkv)
    _qk_norm_rope_bwd[(B, chunks)](dq, dk, dv, qkv, q_weight, k_weight, cos, sin, dqkv, part, N,
                                   H, hd, eps, per_chunk, **_blocks(H, hd))
    return dqkv, part[0].sum((0, 1)).to(q_weight.dtype), part[1].sum((0, 1)).to(k_weight.dtype)


@qk_norm_rope_backward.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, eps):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output):
    qkv, _, q_weight, k_weight, cos, sin, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)


def _backward_fn(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dqkv, dq_weight, dk_weight = qk_norm_rope_backward(dq, dk, dv, qkv, q_weight, k_weight,
                                                       cos, sin, ctx.eps)
    return dqkv, None, dq_weight, dk_weight, None, None, None


qk_norm_rope_op.register_autograd(_backward_fn, setup_context=_setup_context)


def qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps=ref.RMS_EPS):
    if not use_kernel(qkv):
        return ref.qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps)
    return qk_norm_rope_op(qkv, num_heads, q_weight, k_weight, cos, sin, eps)
