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


def gated_residual(x, h, gate):
    """x + gate * h with a per-sample gate (B, D)."""
    return x + gate.unsqueeze(1) * h


def gated_residual_rms_norm_modulate(x, h, gate, weight, shift, scale, eps=RMS_EPS):
    """x_new = x + gate·h and u = mod(RMSNorm(x_new)); returns (x_new, u)."""
    x = gated_residual(x, h, gate)
    return x, rms_norm_modulate(x, weight, shift, scale, eps)


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


def patch_embed(x, w1, w2, b2, pos):
    """Bottleneck patch embedding: two matmuls on the (c, p, q) patch vector, bias, position table.

    w1: (bottleneck, C, p, p) conv weight without bias; w2: (D, bottleneck, 1, 1); b2: (D,);
    pos: (1, N, D). Returns (B, N, D).
    """
    p = w1.shape[-1]
    h = patchify(x, p) @ w1.reshape(w1.shape[0], -1).t()
    return h @ w2.reshape(w2.shape[0], -1).t() + b2 + pos


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


def qk_norm_rope(qkv, num_heads, q_weight, k_weight, cos, sin, eps=RMS_EPS):
    """qkv Linear output (B, N, 3D) -> q, k, v as (B, H, N, hd) with q/k RMSNorm and RoPE."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q = rope(rms_norm(q, q_weight, eps), cos, sin)
    k = rope(rms_norm(k, k_weight, eps), cos, sin)
    return q, k, v


def swiglu(x12):
    """SwiGLU activation on the fused w12 output: silu(a) * b for (a, b) = halves of x12."""
    a, b = x12.chunk(2, dim=-1)
    return F.silu(a) * b
