"""Pure-PyTorch reference of every op the JiT network is built from.

These functions are the numerical ground truth: the model's "torch" backend runs them, and every
fused Triton kernel in ``jitfast.kernels`` is tested against the function of the same name here.
Shapes: B batch, N tokens, D hidden, H heads, hd head dim, p patch size, C channels.
"""
import torch
import torch.nn.functional as F

RMS_EPS = 1e-6


def rms_norm(x, weight, eps=RMS_EPS):
    """RMSNorm computed in float32; the weight is applied before casting back (as the official)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x).to(dtype)


def modulate(x, shift, scale):
    """adaLN modulation: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rms_norm_modulate(x, weight, shift, scale, eps=RMS_EPS):
    return modulate(rms_norm(x, weight, eps), shift, scale)


def gated_residual(x, h, gate, h_bias=None):
    """x + gate·(h + h_bias) with a per-sample gate (B, D); h_bias (D,), the bias of the Linear
    that made h, or None. The result has the dtype of x, h and gate promoted, not the bias's: the
    Linear would have returned h + h_bias in h's dtype (under autocast the official code's bf16
    residual stream stays bf16)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, h.dtype), gate.dtype)
    if h_bias is not None:
        h = h + h_bias
    return (x + gate.unsqueeze(1) * h).to(dtype)


def gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps=RMS_EPS, h_bias=None,
                                     skip=0):
    """x_new = x + gate·(h + h_bias) and u = mod(RMSNorm(x_new)) of the tokens from `skip` on
    (the final layer drops the in-context tokens); returns (x_new, u)."""
    x = gated_residual(x, h, gate, h_bias)
    return x, rms_norm_modulate(x[:, skip:], weight, shift, scale, eps)


def patchify(x, p):
    """NCHW image -> (B, N, C·p·p) patch vectors laid out (c, p, q), tokens row-major."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, channels):
    """(B, N, p·p·C) patch vectors laid out (p, q, c) -> NCHW image (square grid)."""
    B, N, _ = x.shape
    h = int(N ** 0.5)
    x = x.reshape(B, h, h, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, h * p)


def patch_embed(x, w1, w2, b2, pos, noise=None, t=None, noise_scale=1.0,
                in_matmul_dtype=False):
    """Bottleneck patch embedding: two matmuls on the (c, p, q) patch vector, bias, position table.

    w1: (bottleneck, C, p, p) conv weight without bias; w2: (D, bottleneck, 1, 1); b2: (D,);
    pos: (1, N, D). Returns (B, N, D), in the dtype of the matmuls with bias and table promoted,
    or with in_matmul_dtype in the matmuls' (the official JiT's: under autocast its conv returns
    bf16, and `x += pos_embed` keeps it). With noise (shaped like x) and times t (B,), the
    embedding of the noisy images z = t·x + (1 - t)·noise_scale·noise (the training objective's
    input).
    """
    if noise is not None:
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        x = t * x + (1 - t) * (noise * noise_scale)
    p = w1.shape[-1]
    h = patchify(x, p) @ w1.reshape(w1.shape[0], -1).t()
    h = h @ w2.reshape(w2.shape[0], -1).t()
    out = h + b2 + pos
    return out.to(h.dtype) if in_matmul_dtype else out


def output_head(x, weight, bias, p, channels):
    """Final Linear (D -> p·p·C) followed by the unpatchify scatter to NCHW."""
    return unpatchify(F.linear(x, weight, bias), p, channels)


def rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation of interleaved pairs."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def rope(x, cos, sin):
    """Rotary embedding on interleaved pairs. x (B, H, N, hd); cos/sin (N, hd)."""
    return x * cos + rotate_pairs(x) * sin


def bias_gradient_here(x, bias):
    """x, whose value already holds `bias` (its Linear ran with ``bias.detach()``), now also
    passing its gradient, summed over the rows, to `bias`: as the fused ops that form a Linear's
    bias gradient from rows their backward reads anyway."""
    return x if bias is None else x + (bias - bias.detach()).to(x.dtype)


def qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps=RMS_EPS, bias=None):
    """qkv Linear output (B, N, 3D), its bias included -> q, k, v as (B, H, N, hd) with q/k
    RMSNorm and RoPE; v is qkv's v part, as it is. `bias` (3D,), if given, is that Linear's
    bias, run detached: its gradient is formed here (``bias_gradient_here``)."""
    qkv = bias_gradient_here(qkv, bias)
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q = rope(rms_norm(q, q_weight, eps), cos, sin)
    k = rope(rms_norm(k, k_weight, eps), cos, sin)
    return q, k, v


def swiglu(x12, bias=None):
    """SwiGLU activation on the fused w12 output plus its bias (2F,) if given: silu(a) * b for
    (a, b) = halves of x12."""
    if bias is not None:
        x12 = x12 + bias
    a, b = x12.chunk(2, dim=-1)
    return F.silu(a) * b


def swiglu_mlp(x, w12, bias, w3):
    """The SwiGLU MLP without its output bias: swiglu(x·w12ᵀ, bias)·w3ᵀ, w12 (2F, D) the two
    halves' weights stacked, w3 (D', F)."""
    return F.linear(swiglu(F.linear(x, w12), bias), w3)


@torch.no_grad()
def adamw_ema_(param, grad, exp_avg, exp_avg_sq, scalars, betas, eps, weight_decay, emas=(),
               decays=(), copy=None):
    """In place: one AdamW step of `param` (torch's math: decoupled weight decay, then the
    bias-corrected moments), each EMA of `emas` toward the new weight with its decay
    (ema + (1 - decay)·(weight - ema)), and `copy` (the weight's compute copy) from it. scalars:
    (lr, 1/(1 - β1^step), 1/sqrt(1 - β2^step)) as a tensor."""
    lr, correction1, correction2 = scalars
    beta1, beta2 = betas
    grad = grad.float()
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.sub_(lr * correction1 * exp_avg / (exp_avg_sq.sqrt() * correction2 + eps))
    for ema, decay in zip(emas, decays):
        ema.lerp_(param, 1 - decay)
    if copy is not None:
        copy.copy_(param)


# --- Forward-mode derivatives (JVPs) of the ops: value and tangent -------------------------------
# pMF's objective differentiates the network forward along (dz, dt, dr); each op's *_dual returns
# its outputs, then their tangents for the inputs' tangents t* (parameters have none). Written out
# (tests/test_kernels_dual.py holds each to torch.func.jvp of the op above), they are the torch
# backend's dual ops and the reference of the fused kernels' dual forms. The tangents carry no
# gradient (pMF stops it), as the fused forms' do: computed under no_grad.

def _normalized_tangent(x, tx, eps):
    """(x̂, rstd, d(x̂) along tx) of an RMSNorm over the last dim, in float32."""
    x, tx = x.float(), tx.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = x * rstd
    return x_hat, rstd, rstd * (tx - x_hat * (x_hat * tx).mean(-1, keepdim=True))


def rms_norm_modulate_dual(x, weight, shift, scale, tx, eps=RMS_EPS):
    """(u, tu): rms_norm_modulate and its tangent along tx."""
    with torch.no_grad():
        _, _, t_hat = _normalized_tangent(x, tx, eps)
        tu = (weight * t_hat).to(x.dtype) * (1 + scale.unsqueeze(1))
    return rms_norm_modulate(x, weight, shift, scale, eps), tu


def gated_residual_dual(x, h, gate, tx, th, h_bias=None):
    """(x_new, tx_new): gated_residual and its tangent tx + gate·th."""
    with torch.no_grad():
        tx_new = tx + gate.unsqueeze(1) * th
    return gated_residual(x, h, gate, h_bias), tx_new


def gated_residual_rms_norm_modulate_dual(x, h, gate, weight, shift, scale, tx, th,
                                          eps=RMS_EPS, h_bias=None, skip=0):
    """(x_new, u, tx_new, tu): gated_residual_rms_norm_modulate and its tangents."""
    x_new, tx_new = gated_residual_dual(x, h, gate, tx, th, h_bias)
    u, tu = rms_norm_modulate_dual(x_new[:, skip:], weight, shift, scale, tx_new[:, skip:], eps)
    return x_new, u, tx_new, tu


def qk_norm_rope_dual(qkv, num_heads, q_weight, k_weight, cos, sin, tqkv, eps=RMS_EPS,
                      bias=None):
    """(q, k, v, tq, tk, tv): qk_norm_rope and its tangents along tqkv (RoPE is linear)."""
    q, k, v = qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps, bias)
    B, N, _ = tqkv.shape
    tq, tk, tv = tqkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        xq, xk, _ = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        tangents = [rope((w * _normalized_tangent(x, t, eps)[2]).to(x.dtype), cos, sin)
                    for x, t, w in ((xq, tq, q_weight), (xk, tk, k_weight))]
    return q, k, v, *tangents, tv


def swiglu_dual(x12, t12, bias=None):
    """(out, tout): swiglu and its tangent along t12."""
    if bias is not None:
        x12 = x12 + bias
    with torch.no_grad():
        a, b = x12.float().chunk(2, dim=-1)
        ta, tb = t12.float().chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        tout = (sig * (1 + a * (1 - sig)) * ta * b + a * sig * tb).to(x12.dtype)
    return swiglu(x12), tout


def patch_embed_dual(x, w1, w2, b2, pos, tx):
    """(out, tout): patch_embed and its tangent along tx (linear: no bias, no position)."""
    p = w1.shape[-1]
    with torch.no_grad():
        tout = (patchify(tx, p) @ w1.reshape(w1.shape[0], -1).t()
                @ w2.reshape(w2.shape[0], -1).t())
    return patch_embed(x, w1, w2, b2, pos), tout


def attention(q, k, v):
    """softmax(q kᵀ/√hd) v on (B, H, N, hd), in float32 (the math every backend computes)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (scores.softmax(dim=-1) @ v.float()).to(v.dtype)


def attention_dual(q, k, v, tq, tk, tv):
    """(o, to): attention and its tangent, with P = softmax(S), S = q kᵀ/√hd:
    to = (P ⊙ (Ṡ - rowsum(P ⊙ Ṡ))) v + P ṫv, Ṡ = (ṫq kᵀ + q ṫkᵀ)/√hd."""
    scale = q.shape[-1] ** -0.5
    q, k, v, tq, tk, tv = (t.float() for t in (q, k, v, tq, tk, tv))
    probs = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    with torch.no_grad():
        ts = (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1)) * scale
        tprobs = probs * (ts - (probs * ts).sum(-1, keepdim=True))
        tangent = (tprobs @ v + probs @ tv).to(tv.dtype)
    return (probs @ v).to(tv.dtype), tangent


def attention_tangent(q, k, v, tq, tk, tv):
    """The tangent alone of ``attention_dual``."""
    return attention_dual(q, k, v, tq, tk, tv)[1]


def pmf_head_dual(u, weight, bias, z, t, tu, tz, tt, p, t_min=0.05):
    """(velocity, its tangent): pMF's average velocity (z - x̂)/clip(t, t_min, 1) of the head's
    x̂ = output_head(u) (float32, NCHW) and its tangent along tu (of u), tz (of z), tt (of t)."""
    c = t.float().clamp(t_min, 1.0).view(-1, 1, 1, 1)
    velocity = (z.float() - output_head(u, weight, bias, p, z.shape[1]).float()) / c
    with torch.no_grad():
        inside = ((t > t_min) & (t < 1.0)).float().view(-1, 1, 1, 1)
        t_x_hat = output_head(tu, weight, torch.zeros_like(bias), p, z.shape[1]).float()
        tangent = ((tz.float() - t_x_hat) / c
                   - velocity * inside * tt.float().view(-1, 1, 1, 1) / c)
    return velocity, tangent
