"""q/k RMSNorm + 2-D RoPE: from the qkv Linear output (B, N, 3·D), its bias included, to q, k, v
as (B, H, N, hd) tensors laid out (B, N, H, hd) in memory ("BSHD", see ``bshd_empty``); v is a view
of qkv's v part, which nothing changes (flash attention reads its rows where the Linear wrote
them). When the Linear's bias is given, the Linear ran with it detached and its gradient, the sum
of qkv's gradient over the rows, is formed here: the backward kernel reads those rows anyway, a
separate pass (AddmmBackward's) would read them again. The kernels see q (and k) as B·N·H rows
of hd lanes, one per (token, head) in qkv's order — the order of the outputs' memory too — and
work on 2-D tiles of such rows (a tile may span tokens and samples: nothing is per sample). Each
row is normalised, then RoPE rotates its interleaved pairs, split apart and joined back in
registers:

    out[2i]   = y[2i]·cos[2i]     - y[2i+1]·sin[2i],
    out[2i+1] = y[2i+1]·cos[2i+1] + y[2i]·sin[2i+1],

with y = w·x·rstd, all in float32. q and k are written in qkv's dtype (the reference promotes
them to the tables' dtype; attention casts them back anyway). The forward's tiles are BLOCK_M
rows; the backward's are BLOCK_T whole tokens, each token's heads padded to H_PAD rows (a power of
two), so that a tile's rows fold into (BLOCK_T, H_PAD, hd) and sum over its tokens into the
bias grad of each (head, lane). The backward recomputes rstd from qkv; each program takes a
contiguous run of tiles (program_tiles) and reduces the q/k norm weight grads and the bias grad
over each tile into one partial row per program, summed afterwards. The tile's size in elements
is autotuned (TILE); BLOCK_M and BLOCK_T follow from it. The head dim is a constexpr
(HD): row offsets are then known multiples of it, so loads and stores vectorise even where hd is
not a multiple of 16 (JiT-G's 104, in 128 lanes). The dual op (pMF's JVP) writes v and its
tangent as copies: a custom op may not return a view of its input.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import (autotune, block, empty, program_tiles, reduction_programs, row_bucket,
                      tile_rows, use_kernel)

# (TILE, num_warps): 8 to 32 elements of a tile per thread (the backward keeps about twice as many
# tiles live, hence half the sizes). At hd = 64 a forward tile has 32 to 128 rows (2.7 to 10.7
# tokens of JiT-B's 12 heads) and a backward one 16 to 64.
FWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))]
BWD_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
               for t, w in ((2048, 4), (1024, 4), (2048, 8), (4096, 8))]


@triton.jit
def _qk_tile(tile, n_rows, n_tok, H, HD: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_HD: tl.constexpr):
    """Tile `tile` of the (token, head) rows: each row's offset into qkv's q part and into a
    BSHD q (k, v) and its token's index within its sample, all (BLOCK_M, 1); then the lanes
    (1, BLOCK_HD) and the tile's mask."""
    r = (tile * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]).to(tl.int64)
    token, head = r // H, r % H
    src = token * 3 * H * HD + head * HD
    lanes = tl.arange(0, BLOCK_HD)[None, :]
    return src, r * HD, token % n_tok, lanes, (r < n_rows) & (lanes < HD)


@triton.jit
def _token_tile(tile, n_tokens, n_tok, H, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                H_PAD: tl.constexpr, BLOCK_HD: tl.constexpr):
    """_qk_tile's values for tile `tile` of whole tokens: row i is head i % H_PAD of token
    tile·BLOCK_T + i // H_PAD (heads from H on are masked)."""
    i = tl.arange(0, BLOCK_T * H_PAD)[:, None]
    token = (tile * BLOCK_T + i // H_PAD).to(tl.int64)
    head = i % H_PAD
    lanes = tl.arange(0, BLOCK_HD)[None, :]
    mask = (token < n_tokens) & (head < H) & (lanes < HD)
    return token * 3 * H * HD + head * HD, (token * H + head) * HD, token % n_tok, lanes, mask


@triton.jit
def _pairs(x):
    """(even lanes, odd lanes) of a tile."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _interleaved(even, odd):
    """The tile whose even and odd lanes are `even` and `odd`: _pairs' inverse."""
    return tl.reshape(tl.join(even, odd), [even.shape[0], 2 * even.shape[1]])


@triton.jit
def _normalized(x, HD, eps):
    """(x̂, rstd) of a tile of rows."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
    return x * rstd, rstd


@triton.jit
def _rows(QKV, src, part, mask, D):
    """The tile of rows of qkv's q or k part (0, 1) at offsets src, in float32."""
    return tl.load(QKV + src + part * D, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight(W, lanes, HD):
    """A norm weight as a (1, BLOCK_HD) row in float32."""
    return tl.load(W + lanes, mask=lanes < HD, other=0.0).to(tl.float32)


@triton.jit
def _rope(y, cos, sin):
    """RoPE's rotation of the interleaved pairs of a tile."""
    y_even, y_odd = _pairs(y)
    cos_even, cos_odd = _pairs(cos)
    sin_even, sin_odd = _pairs(sin)
    return _interleaved(y_even * cos_even - y_odd * sin_even, y_odd * cos_odd + y_even * sin_odd)


@triton.jit
def _norm_rope(x, W, OUT, lanes, mask, cos, sin, HD, eps):
    """Normalise and rotate a tile of q (or k) rows into OUT."""
    x_hat, _ = _normalized(x, HD, eps)
    tl.store(OUT, _rope(x_hat * _weight(W, lanes, HD), cos, sin), mask=mask)


@triton.jit
def _norm_rope_tangent(x, tx, W, TOUT, lanes, mask, cos, sin, HD, eps):
    """The tangent of _norm_rope along tx, into TOUT: RoPE of w·rstd·(ṫx - x̂·mean(x̂·ṫx))."""
    x_hat, rstd = _normalized(x, HD, eps)
    t_hat = rstd * (tx - x_hat * (tl.sum(x_hat * tx, axis=1) / HD)[:, None])
    tl.store(TOUT, _rope(t_hat * _weight(W, lanes, HD), cos, sin), mask=mask)


@triton.jit
def _norm_rope_backward(x, W, DOUT, DSRC, lanes, mask, cos, sin, HD, eps):
    """Write the grad of a tile of q (or k) rows x to DSRC; return it, and its norm weight grad
    summed over the tile's rows."""
    x_hat, rstd = _normalized(x, HD, eps)
    dout_even, dout_odd = _pairs(tl.load(DOUT, mask=mask, other=0.0).to(tl.float32))
    cos_even, cos_odd = _pairs(cos)
    sin_even, sin_odd = _pairs(sin)
    dy = _interleaved(dout_even * cos_even + dout_odd * sin_odd,
                      dout_odd * cos_odd - dout_even * sin_even)
    dx_hat = dy * _weight(W, lanes, HD)
    dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / HD)[:, None])
    tl.store(DSRC, dx, mask=mask)
    return dx, tl.sum(dy * x_hat, axis=0)


@triton.jit
def _per_head(tile, BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, BLOCK_HD: tl.constexpr):
    """A token tile's rows summed over its tokens: (H_PAD, BLOCK_HD)."""
    return tl.sum(tl.reshape(tile, [BLOCK_T, H_PAD, BLOCK_HD]), axis=0)


@triton.jit
def _tables(COS, SIN, t, lanes, mask, HD):
    """The rows' RoPE cos and sin, in float32."""
    cos = tl.load(COS + t * HD + lanes, mask=mask, other=0.0).to(tl.float32)
    return cos, tl.load(SIN + t * HD + lanes, mask=mask, other=0.0).to(tl.float32)


@autotune(FWD_CONFIGS, key=["H", "HD", "TANGENT"])
@tile_rows("BLOCK_HD")
@triton.jit
def _qk_norm_rope_fwd(QKV, WQ, WK, COS, SIN, Q, K, V, TQKV, TQ, TK, TV, n_rows, n_tok, H,
                      HD: tl.constexpr, eps, ROW_BUCKET, TANGENT: tl.constexpr,
                      BLOCK_HD: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program `tile` handles BLOCK_M (token, head) rows (TILE only sets BLOCK_M): their q and k;
    with TANGENT also a copy of their v, and their tangents, from TQKV (laid out as qkv) to TQ,
    TK, TV (as q, k, v). QKV's rows are 3·D apart whether it is qkv or its q and k parts."""
    src, dst, t, lanes, mask = _qk_tile(tl.program_id(0), n_rows, n_tok, H, HD, BLOCK_M,
                                        BLOCK_HD)
    cos, sin = _tables(COS, SIN, t, lanes, mask, HD)
    src = src + lanes
    dst = dst + lanes
    D = H * HD
    xq = _rows(QKV, src, 0, mask, D)
    xk = _rows(QKV, src, 1, mask, D)
    _norm_rope(xq, WQ, Q + dst, lanes, mask, cos, sin, HD, eps)
    _norm_rope(xk, WK, K + dst, lanes, mask, cos, sin, HD, eps)
    if TANGENT:
        tl.store(V + dst, tl.load(QKV + src + 2 * D, mask=mask), mask=mask)
        tq = tl.load(TQKV + src, mask=mask, other=0.0).to(tl.float32)
        tk = tl.load(TQKV + src + D, mask=mask, other=0.0).to(tl.float32)
        _norm_rope_tangent(xq, tq, WQ, TQ + dst, lanes, mask, cos, sin, HD, eps)
        _norm_rope_tangent(xk, tk, WK, TK + dst, lanes, mask, cos, sin, HD, eps)
        tl.store(TV + dst, tl.load(TQKV + src + 2 * D, mask=mask), mask=mask)


@autotune(BWD_CONFIGS, key=["H", "HD"])
@triton.heuristics({"BLOCK_T": lambda a: max(1, a["TILE"] // (a["BLOCK_HD"] * a["H_PAD"]))})
@triton.jit
def _qk_norm_rope_bwd(DQ, DK, DV, QKV, WQ, WK, COS, SIN, DQKV, DW_PART, DB_PART, n_tokens,
                      n_tok, H, HD: tl.constexpr, eps, ROW_BUCKET, HAS_BIAS: tl.constexpr,
                      H_PAD: tl.constexpr, BLOCK_HD: tl.constexpr, TILE: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """Program p handles a run of token tiles and writes its partial sums of the q and k norm
    weight grads to DW_PART[0 or 1, p], and with HAS_BIAS of the bias grad to DB_PART[p]
    (3, H, hd). QKV: qkv's q and k parts (rows 3·D apart)."""
    first, last = program_tiles(n_tokens, BLOCK_T)
    D = H * HD
    dw_q = tl.zeros([BLOCK_HD], dtype=tl.float32)
    dw_k = tl.zeros([BLOCK_HD], dtype=tl.float32)
    db_q = tl.zeros([H_PAD, BLOCK_HD], dtype=tl.float32)
    db_k = tl.zeros([H_PAD, BLOCK_HD], dtype=tl.float32)
    db_v = tl.zeros([H_PAD, BLOCK_HD], dtype=tl.float32)
    for tile in tl.range(first, last, num_stages=2):  # loads the next tile during this one
        src, dst, t, lanes, mask = _token_tile(tile, n_tokens, n_tok, H, HD, BLOCK_T, H_PAD,
                                               BLOCK_HD)
        cos, sin = _tables(COS, SIN, t, lanes, mask, HD)
        src = src + lanes
        dst = dst + lanes
        dq, dw = _norm_rope_backward(_rows(QKV, src, 0, mask, D), WQ, DQ + dst, DQKV + src,
                                     lanes, mask, cos, sin, HD, eps)
        dw_q += dw
        dk, dw = _norm_rope_backward(_rows(QKV, src, 1, mask, D), WK, DK + dst, DQKV + src + D,
                                     lanes, mask, cos, sin, HD, eps)
        dw_k += dw
        dv = tl.load(DV + dst, mask=mask)
        tl.store(DQKV + src + 2 * D, dv, mask=mask)
        if HAS_BIAS:
            db_q += _per_head(dq, BLOCK_T, H_PAD, BLOCK_HD)
            db_k += _per_head(dk, BLOCK_T, H_PAD, BLOCK_HD)
            db_v += _per_head(dv.to(tl.float32), BLOCK_T, H_PAD, BLOCK_HD)
    lane = tl.arange(0, BLOCK_HD)
    part = tl.program_id(0) * HD + lane
    tl.store(DW_PART + part, dw_q, mask=lane < HD)
    tl.store(DW_PART + tl.num_programs(0) * HD + part, dw_k, mask=lane < HD)
    if HAS_BIAS:
        heads = tl.arange(0, H_PAD)[:, None]
        offs = tl.program_id(0).to(tl.int64) * 3 * D + heads * HD + lane[None, :]
        mask = (heads < H) & (lane[None, :] < HD)
        tl.store(DB_PART + offs, db_q, mask=mask)
        tl.store(DB_PART + offs + D, db_k, mask=mask)
        tl.store(DB_PART + offs + 2 * D, db_v, mask=mask)


def bshd_empty(qkv, num_heads):
    """An empty (B, H, N, hd) tensor for q, k or v laid out (B, N, H, hd): the layout flash and
    cuDNN attention read natively and write their output in, so that the model's transpose of
    that output back to (B, N, D) is free, and so is its backward."""
    B, N, D3 = qkv.shape
    hd = D3 // 3 // num_heads
    return qkv.new_empty_strided((B, num_heads, N, hd), (N * num_heads * hd, hd, num_heads * hd, 1))


def bshd(grad):
    """A (B, H, N, hd) grad as its contiguous (B, N, H, hd) layout (no copy if it is BSHD)."""
    return grad.transpose(1, 2).contiguous()


def v_view(qkv, num_heads):
    """qkv's v part as a (B, H, N, hd) view (its rows 3·D apart)."""
    B, N, D3 = qkv.shape
    return qkv.unflatten(-1, (3, num_heads, D3 // 3 // num_heads))[:, :, 2].transpose(1, 2)


def _forward(qkv, num_heads, q_weight, k_weight, cos, sin, eps, tqkv=None):
    """(q, k); with the tangent tqkv of qkv, (q, k, v, tq, tk, tv)."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    B, N, D3 = qkv.shape
    hd = D3 // 3 // num_heads
    outputs = [bshd_empty(qkv, num_heads) for _ in range(2 if tqkv is None else 6)]
    if tqkv is None:  # the kernel reads the q and k parts only
        source, writes = qkv[..., :2 * D3 // 3], [*outputs, None, None, None, None, None]
    else:
        source, writes = qkv, [*outputs[:3], tqkv.contiguous(), *outputs[3:]]
    n_rows = B * N * num_heads
    _qk_norm_rope_fwd[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)](
        source, q_weight, k_weight, cos, sin, *writes, n_rows, N, num_heads, hd, eps,
        ROW_BUCKET=row_bucket(n_rows), TANGENT=tqkv is not None, BLOCK_HD=block(hd, 2))
    return tuple(outputs)


@torch.library.custom_op("jitfast::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(qkv: torch.Tensor, num_heads: int, q_weight: torch.Tensor,
                    k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k); no autograd of its own: ``QKNormRoPE`` is the autograd of q, k and v together."""
    return _forward(qkv, num_heads, q_weight, k_weight, cos, sin, eps)


@qk_norm_rope_op.register_fake
def _(qkv, num_heads, q_weight, k_weight, cos, sin, eps):
    return bshd_empty(qkv, num_heads), bshd_empty(qkv, num_heads)


@torch.library.custom_op("jitfast::qk_norm_rope_dual", mutates_args=())
def qk_norm_rope_dual_op(qkv: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                         q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, eps: float, tqkv: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor]:
    """(q, k, v, tq, tk, tv): ``qk_norm_rope`` and the tangents along tqkv, one pass. Gradients
    flow through q, k, v only; `bias` (already in qkv) only gets its gradient."""
    return _forward(qkv, num_heads, q_weight, k_weight, cos, sin, eps, tqkv)


@qk_norm_rope_dual_op.register_fake
def _(qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps, tqkv):
    return tuple(bshd_empty(qkv, num_heads) for _ in range(6))


@torch.library.custom_op("jitfast::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                          qkv: torch.Tensor, bias: Optional[torch.Tensor],
                          q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (dqkv, d(q_weight, k_weight) as one (2, hd) tensor, dbias); dbias empty without a
    bias."""
    B, H, N, hd = dq.shape
    dq, dk, dv, qkv = bshd(dq), bshd(dk), bshd(dv), qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    n_tokens = B * N
    programs = reduction_programs(1, n_tokens, qkv.device)
    dw_part = qkv.new_empty(2, programs, hd, dtype=torch.float32)
    db_part = qkv.new_empty(programs, 3 * H * hd, dtype=torch.float32) if bias is not None \
        else empty(qkv)
    dqkv = torch.empty_like(qkv)
    _qk_norm_rope_bwd[(programs,)](dq, dk, dv, qkv[..., :2 * H * hd], q_weight, k_weight, cos,
                                   sin, dqkv, dw_part, db_part, n_tokens, N, H, hd, eps,
                                   ROW_BUCKET=row_bucket(n_tokens * H), HAS_BIAS=bias is not None,
                                   H_PAD=triton.next_power_of_2(H), BLOCK_HD=block(hd, 2))
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else empty(qkv)
    return dqkv, dw_part.sum(1).to(q_weight.dtype), dbias


@qk_norm_rope_backward.register_fake
def _(dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, eps):
    dbias = empty(qkv) if bias is None else torch.empty_like(bias)
    return torch.empty_like(qkv), q_weight.new_empty(2, q_weight.shape[0]), dbias


def _gradients(ctx, dq, dk, dv):
    """The grads of (qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps)."""
    qkv, bias, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dqkv, dweights, dbias = qk_norm_rope_backward(dq, dk, dv, qkv, bias, q_weight, k_weight, cos,
                                                  sin, ctx.eps)
    return (dqkv, None if bias is None else dbias, None, dweights[0], dweights[1], None, None,
            None)


class QKNormRoPE(torch.autograd.Function):
    """q and k from the kernel, v a view of qkv; the backward one kernel writing all of dqkv. A
    Function rather than the op's own autograd: a custom op may not return a view of its input,
    and v's grad must reach the kernel (autograd would sum a separate view's grad into a zeroed
    copy of qkv)."""

    @staticmethod
    def forward(ctx, qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps):
        ctx.eps = eps
        ctx.save_for_backward(qkv, bias, q_weight, k_weight, cos, sin)
        return *qk_norm_rope_op(qkv, num_heads, q_weight, k_weight, cos, sin, eps), \
            v_view(qkv, num_heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return _gradients(ctx, dq, dk, dv)


def _setup_dual_context(ctx, inputs, output):
    qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps = inputs[:8]
    ctx.eps, ctx.num_heads = eps, num_heads
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qkv, bias, q_weight, k_weight, cos, sin)


def _dual_backward_fn(ctx, dq, dk, dv, _tq, _tk, _tv):
    """The primal's backward; a q, k or v that got no grad counts as a zero one."""
    if dq is None or dk is None or dv is None:
        zero = bshd_empty(ctx.saved_tensors[0], ctx.num_heads).zero_()
        dq, dk, dv = (zero if g is None else g for g in (dq, dk, dv))
    return *_gradients(ctx, dq, dk, dv), None


qk_norm_rope_dual_op.register_autograd(_dual_backward_fn, setup_context=_setup_dual_context)


def qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps=ref.RMS_EPS, bias=None):
    if not use_kernel(qkv):
        return ref.qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps, bias)
    return QKNormRoPE.apply(qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope_dual(qkv, num_heads, q_weight, k_weight, cos, sin, tqkv, eps=ref.RMS_EPS,
                      bias=None):
    if not use_kernel(qkv):
        return ref.qk_norm_rope_dual(qkv, num_heads, q_weight, k_weight, cos, sin, tqkv, eps,
                                     bias)
    return qk_norm_rope_dual_op(qkv, bias, num_heads, q_weight, k_weight, cos, sin, eps, tqkv)
