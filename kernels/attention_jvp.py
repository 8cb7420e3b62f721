"""The tangent of attention, softmax(QKᵀ/√d)·V along (Q̇, K̇, V̇), in one flash-style pass.

SDPA's flash, cuDNN and memory-efficient backends have no forward-mode AD, and torch.func.jvp
through attention falls back to the math path's (N × N) scores. With P = softmax(S), S = QKᵀ/√d
and Ṡ = (Q̇Kᵀ + QK̇ᵀ)/√d, the tangent is

    Ȯ = (P ⊙ (Ṡ - μ))·V + P·V̇,   μ_i = Σ_j P_ij Ṡ_ij,

which one pass over the keys accumulates with the online softmax's running maximum m and sum l:
Σ p·V, Σ (p ⊙ Ṡ)·V, Σ p·V̇ and Σ p ⊙ Ṡ, each rescaled when m grows, then
Ȯ = (Σ(p ⊙ Ṡ)V - μ·ΣpV)/l + ΣpV̇/l with μ = Σ p ⊙ Ṡ / l. Memory is O(N): no score matrix.

The primal (and its backward) stays SDPA's; this op is the tangent alone, with no gradient (pMF
stops the gradient of its JVP). Program (query block, batch·head); q, k, v and their tangents in
any (B, H, N, hd) strides (jitfast's are laid out BSHD); the tangent is written BSHD.
"""
import torch
import triton
import triton.language as tl

from jitfast.functional import ops as ref

from ._common import autotune, block, dot_precision, row_bucket, use_kernel

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
           for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2))]


@triton.jit
def _tile(PTR, b, h, rows, lanes, N, HD, strides):
    """The (rows, lanes) tile of head h of sample b of a (B, H, N, hd) tensor, zero outside."""
    s_b, s_h, s_n = strides
    return tl.load(PTR + b * s_b + h * s_h + rows[:, None] * s_n + lanes[None, :],
                   mask=(rows[:, None] < N) & (lanes[None, :] < HD), other=0.0)


@autotune(CONFIGS, key=["N", "HD"])
@triton.jit
def _attention_jvp_fwd(Q, K, V, TQ, TK, TV, TO, H, N, HD, scale, s_qb, s_qh, s_qn, s_kb, s_kh,
                       s_kn, s_vb, s_vh, s_vn, s_tqb, s_tqh, s_tqn, s_tkb, s_tkh, s_tkn, s_tvb,
                       s_tvh, s_tvn, ROW_BUCKET, PRECISION: tl.constexpr, BLOCK_HD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, BLOCK_HD)
    q = _tile(Q, b, h, rows, lanes, N, HD, (s_qb, s_qh, s_qn))
    tq = _tile(TQ, b, h, rows, lanes, N, HD, (s_tqb, s_tqh, s_tqn))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    acc_tv = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, cols, lanes, N, HD, (s_kb, s_kh, s_kn))
        tk = _tile(TK, b, h, cols, lanes, N, HD, (s_tkb, s_tkh, s_tkn))
        v = _tile(V, b, h, cols, lanes, N, HD, (s_vb, s_vh, s_vn))
        tv = _tile(TV, b, h, cols, lanes, N, HD, (s_tvb, s_tvh, s_tvn))
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        ts = (tl.dot(tq, tl.trans(k), input_precision=PRECISION)
              + tl.dot(q, tl.trans(tk), input_precision=PRECISION)) * scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        pts = p * ts
        l_i = l_i * alpha + tl.sum(p, axis=1)
        mu = mu * alpha + tl.sum(pts, axis=1)
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc_s = acc_s * alpha[:, None] + tl.dot(pts.to(v.dtype), v, input_precision=PRECISION)
        acc_tv = acc_tv * alpha[:, None] + tl.dot(p.to(tv.dtype), tv, input_precision=PRECISION)
        m_i = m_new
    inv_l = 1.0 / l_i
    to = (acc_s - (mu * inv_l)[:, None] * acc_o + acc_tv) * inv_l[:, None]
    # BSHD: row n of head h of sample b at ((b·N + n)·H + h)·hd
    out = ((b * N + rows[:, None]) * H + h) * HD + lanes[None, :]
    tl.store(TO + out, to, mask=(rows[:, None] < N) & (lanes[None, :] < HD))


def bshd_empty_like(q):
    """An empty (B, H, N, hd) tensor laid out (B, N, H, hd), q's dtype."""
    B, H, N, hd = q.shape
    return q.new_empty_strided((B, H, N, hd), (N * H * hd, hd, H * hd, 1))


@torch.library.custom_op("jitfast::attention_jvp", mutates_args=())
def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor,
                  tk: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """The tangent of softmax(q kᵀ/√hd)·v along (tq, tk, tv); (B, H, N, hd) each."""
    B, H, N, hd = q.shape
    to = bshd_empty_like(tv)
    tensors = (q, k, v, tq, tk, tv)
    strides = [s for t in tensors for s in t.stride()[:3]]
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("attention_jvp needs each tensor's head dim contiguous")
    _attention_jvp_fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        *tensors, to, H, N, hd, hd ** -0.5, *strides, ROW_BUCKET=row_bucket(B * H * N),
        PRECISION=dot_precision(q.dtype), BLOCK_HD=block(hd))
    return to


@attention_jvp.register_fake
def _(q, k, v, tq, tk, tv):
    return bshd_empty_like(tv)


def attention_tangent(q, k, v, tq, tk, tv):
    """The tangent of attention(q, k, v) (``jitfast.functional.ops.attention``) along
    (tq, tk, tv), O(N) memory; no gradient."""
    if not use_kernel(q):
        return ref.attention_tangent(q, k, v, tq, tk, tv)
    return attention_jvp(q, k, v, tq, tk, tv)
