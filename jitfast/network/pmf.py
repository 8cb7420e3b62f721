"""pixel MeanFlow (pMF, Lu et al. 2026): the one-step successor of JiT, as the official PyTorch
port defines it (github Lyy-iiis/pMF, branch ``torch``: ``models/pmfDiT.py``), for inference.

A DiT with in-context conditioning and no adaLN: 20 prefix tokens (8 class, 4 guidance scale,
2 + 2 guidance interval, 4 time), each a learned token plus an embedding of its input, then the
patch tokens; a learned position table over all of them; 2-D RoPE on the patch tokens only.
Blocks: x += attn(RMSNorm(x))·attn_scale; x += SwiGLU(RMSNorm(x))·mlp_scale, per-channel gates.
A shared trunk of depth - head_depth blocks, then the u-head's blocks and a final RMSNorm and
Linear: x̂, read as the average velocity u = (z - x̂)/max(t, 0.05). pMF's time runs the other
way from JiT's: t = 1 is noise, t = 0 data. (The training-only v-head is not built.)

The ops are JiT's (``jitfast.network.backend``): the patch embedding's first bias is folded into
the second (exact up to rounding), the per-channel gates are JiT's per-sample gates with a
stride-0 batch dimension and the unmodulated norms its modulated ones with zero shift and scale;
q, k, v and SwiGLU's two input projections are each one matmul (the published files' separate
weights are concatenated on loading, ``jitfast.io.pmf_weights``).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jitfast.functional.positions import rope_2d
from jitfast.network.alignment import PaddedSwiGLU
from jitfast.network.attention import attention
from jitfast.network.backend import check_backend, ops_for
from jitfast.network.model import (LabelEmbedder, RMSNorm, TimestepEmbedder, can_inspect_values,
                                   check_batch_inputs, check_geometry, check_image_batch)

U_T_MIN = 0.05  # u = (z - x̂)/max(t, U_T_MIN)
TOKENS = (("class", 8), ("omega", 4), ("t_min", 2), ("t_max", 2), ("time", 4))  # prefix order


def official_mlp_hidden(hidden_size, mlp_ratio=8 / 3):
    """SwiGLU's hidden width in the official port: int(D·8/3), rounded up to a multiple of 8
    above width 1024."""
    width = int(hidden_size * mlp_ratio)
    return (width + 7) // 8 * 8 if hidden_size > 1024 else width


def default_bottleneck(hidden_size):
    """The official patch-embedding bottleneck: 128 channels, 256 above width 1024."""
    return 128 if hidden_size <= 1024 else 256


def tangent_linear(weight, tx):
    """A bias-free Linear's tangent along tx: tx·Wᵀ, without gradient (pMF stops the gradient of
    its JVP)."""
    with torch.no_grad():
        return F.linear(tx, weight)


class PMFAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # official q_proj, k_proj, v_proj
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, ops):
        B, N, D = x.shape
        q, k, v = ops.qk_norm_rope(self.qkv(x), self.num_heads, self.q_norm.weight,
                                   self.k_norm.weight, *rope)
        return self.out_proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def forward_dual(self, x, tx, rope, ops):
        """(output, its tangent along tx): the value through SDPA (its backward as always), the
        tangent through the dual ops and attention's flash-style tangent."""
        B, N, D = x.shape
        q, k, v, tq, tk, tv = ops.qk_norm_rope_dual(
            self.qkv(x), self.num_heads, self.q_norm.weight, self.k_norm.weight, *rope,
            tangent_linear(self.qkv.weight, tx))
        out = self.out_proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        with torch.no_grad():
            t_attn = ops.attention_tangent(q, k, v, tq, tk, tv).transpose(1, 2).reshape(B, N, D)
        return out, tangent_linear(self.out_proj.weight, t_attn)


class PMFMlp(nn.Module, PaddedSwiGLU):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # official w1 (gate), w3 (up)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def unpadded(self):
        return self.w13.weight, None, self.w2.weight

    def weights(self):
        """(w13, w2) with the hidden width padded to a multiple of 8 (``PaddedSwiGLU``)."""
        w13, _, w2 = self.swiglu_weights()
        return w13, w2

    def forward(self, x, ops):
        w13, w2 = self.weights()
        return ops.swiglu_mlp(x, w13, None, w2)

    def forward_dual(self, x, tx, ops):
        w13, w2 = self.weights()
        hidden, t_hidden = ops.swiglu_dual(F.linear(x, w13), tangent_linear(w13, tx))
        return F.linear(hidden, w2), tangent_linear(w2, t_hidden)


class PMFBlock(nn.Module):
    """x += attn(RMSNorm(x))·attn_scale; x += SwiGLU(RMSNorm(x))·mlp_scale. As JiT's blocks
    (``jitfast.network.model.JiTBlock``), each residual update is added by the fused op that
    normalises its result: the MLP's, returned as `pending` (h, gate), by the next block's first
    norm or the final layer's, so that the residual stream's gradient is summed inside the norm
    backward."""

    def __init__(self, dim, num_heads, mlp_hidden):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = PMFAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = PMFMlp(dim, mlp_hidden)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    forward_methods = ("forward_dual",)  # called in place of forward (FSDP2 hooks them too)

    def forward(self, x, rope, ops, zeros, pending=None, defer=False):
        """zeros: a (B, D) zero shift/scale for the unmodulated norms; pending: the previous
        block's MLP update (h, gate) not yet added to x. Returns (x, pending): with defer, this
        block's MLP update is left pending, else added (None)."""
        B = x.shape[0]
        if pending is None:
            u = ops.rms_norm_modulate(x, self.norm1.weight, zeros, zeros)
        else:
            x, u = ops.gated_residual_rms_norm_modulate(x, *pending, self.norm1.weight, zeros,
                                                        zeros)
        x, u = ops.gated_residual_rms_norm_modulate(
            x, self.attn(u, rope, ops), self.attn_scale.expand(B, -1), self.norm2.weight,
            zeros, zeros)
        pending = (self.mlp(u, ops), self.mlp_scale.expand(B, -1))
        return (x, pending) if defer else (ops.gated_residual(x, *pending), None)

    def forward_dual(self, x, tx, rope, ops, zeros, pending=None, defer=False):
        """``forward`` of (x, tx) and their tangents, each op's value and tangent in one pass;
        pending: (h, gate, th). Returns (x, tx, pending)."""
        B = x.shape[0]
        if pending is None:
            u, tu = ops.rms_norm_modulate_dual(x, self.norm1.weight, zeros, zeros, tx)
        else:
            h, gate, th = pending
            x, u, tx, tu = ops.gated_residual_rms_norm_modulate_dual(
                x, h, gate, self.norm1.weight, zeros, zeros, tx, th)
        h, th = self.attn.forward_dual(u, tu, rope, ops)
        x, u, tx, tu = ops.gated_residual_rms_norm_modulate_dual(
            x, h, self.attn_scale.expand(B, -1), self.norm2.weight, zeros, zeros, tx, th)
        h, th = self.mlp.forward_dual(u, tu, ops)
        gate = self.mlp_scale.expand(B, -1)
        if defer:
            return x, tx, (h, gate, th)
        return (*ops.gated_residual_dual(x, h, gate, tx, th), None)


class PMFFinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)


class PatchEmbedWithBias(nn.Module):
    """The bottleneck patch embedding with a bias on both convolutions (JiT's has none on the
    first); ``folded_bias`` is the one bias of both: proj2(proj1(x)) = W2·W1·x + W2·b1 + b2."""

    def __init__(self, patch_size, in_chans, bottleneck_dim, embed_dim):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, bottleneck_dim, patch_size, patch_size)
        self.proj2 = nn.Conv2d(bottleneck_dim, embed_dim, 1, 1)

    def folded_bias(self):
        w2 = self.proj2.weight.flatten(1)
        return self.proj2.bias + w2 @ self.proj1.bias.to(w2.dtype)


class PMF(nn.Module):
    """The pMF network. ``forward(z, t, h, omega, t_min, t_max, y)`` returns the average
    velocity u (B, C, H, W) at noisy images z and times t (B,) (pMF's convention: t = 1 noise),
    for the step h = t - r, guidance scale omega >= 1 and guidance interval [t_min, t_max] (all
    (B,)), and labels y (B,) in [0, num_classes] (num_classes: the null class; y=None: it for
    every example). ``forward(..., head=f)`` returns f(u_tokens, weight, bias) of the final
    Linear's input tokens instead, for a sampler that fuses its update into the head.

    Keywords are the official ``pmfDiT``'s, but ``mlp_hidden`` (the official rule:
    ``official_mlp_hidden``) and ``bottleneck_dim`` (128, or 256 above width 1024), which it
    derives; ``backend`` selects the op implementations as for JiT.
    """

    family = "pMF"
    forward_methods = ("velocities", "forward_dual")  # called in place of forward

    def example_inputs(self, batch, device=None, dtype=None):
        """forward's tensor arguments by name, a batch of `batch` (``torch.export``'s example)."""
        size = self.input_size

        def times(value):
            return torch.full((batch,), value, device=device)
        return dict(z=torch.zeros(batch, self.in_channels, size, size, device=device, dtype=dtype),
                    t=times(0.5), h=times(0.5), omega=times(2.0), t_min=times(0.0),
                    t_max=times(1.0), y=torch.zeros(batch, dtype=torch.long, device=device))

    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=768, depth=16,
                 num_heads=12, num_classes=1000, head_depth=8, mlp_hidden=None,
                 bottleneck_dim=None, v_head=False, backend="auto"):
        super().__init__()
        check_geometry(input_size, patch_size, hidden_size, num_heads)
        if not 0 < head_depth <= depth:
            raise ValueError(f"head_depth {head_depth} must lie in [1, depth={depth}]")
        mlp_hidden = mlp_hidden or official_mlp_hidden(hidden_size)
        bottleneck_dim = bottleneck_dim or default_bottleneck(hidden_size)
        self.backend = check_backend(backend)
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           num_classes=num_classes, head_depth=head_depth, mlp_hidden=mlp_hidden,
                           bottleneck_dim=bottleneck_dim, v_head=v_head)
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.check_values = True
        self.fuse_across_blocks = True  # see JiT: off under FSDP2
        grid = input_size // patch_size
        self.num_prefix = sum(n for _, n in TOKENS)

        self.x_embedder = PatchEmbedWithBias(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size)
        self.omega_embedder = TimestepEmbedder(hidden_size)
        self.cfg_t_start_embedder = TimestepEmbedder(hidden_size)
        self.cfg_t_end_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        for name, count in TOKENS:
            self.register_parameter(f"{name}_tokens",
                                    nn.Parameter(torch.zeros(1, count, hidden_size)))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + grid * grid, hidden_size))
        cos, sin = rope_2d(hidden_size // num_heads, grid, self.num_prefix)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.shared_blocks = nn.ModuleList(
            PMFBlock(hidden_size, num_heads, mlp_hidden) for _ in range(depth - head_depth))
        self.u_heads = nn.ModuleList(
            PMFBlock(hidden_size, num_heads, mlp_hidden) for _ in range(head_depth))
        self.u_final_layer = PMFFinalLayer(hidden_size, patch_size, in_channels)
        if v_head:  # training only: the instantaneous velocity's head, beside the u-head
            self.v_heads = nn.ModuleList(
                PMFBlock(hidden_size, num_heads, mlp_hidden) for _ in range(head_depth))
            self.v_final_layer = PMFFinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation (weight_init_constant 0.32 in the blocks, 1 elsewhere);
        the gates and the final Linear start at zero."""
        D = self.config["hidden_size"]
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 0.32 if name.startswith(("shared_blocks", "u_heads", "v_heads")) else 1.0
                nn.init.normal_(module.weight, std=scale / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):  # like nn.Linear (Xavier)
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=1 / math.sqrt(D))
        for name, _ in TOKENS:
            nn.init.normal_(getattr(self, f"{name}_tokens"), std=1 / math.sqrt(D))
        nn.init.normal_(self.pos_embed, std=0.02)
        for final in self.final_layers():
            nn.init.zeros_(final.linear.weight)

    def final_layers(self):
        return (self.u_final_layer, *((self.v_final_layer,) if self.has_v_head else ()))

    @property
    def has_v_head(self):
        return self.config["v_head"]

    @property
    def blocks(self):
        return (*self.shared_blocks, *self.u_heads)

    @property
    def sharding_units(self):
        """The modules FSDP2 shards one by one (the rest is the root's): every block."""
        return (*self.shared_blocks, *self.u_heads, *self.v_heads)

    def check_inputs(self, z, scalars, y):
        """Raise a ValueError/TypeError that says what was expected and what was given."""
        check_image_batch(z, "z", self.in_channels, self.input_size)
        B = z.shape[0]
        check_batch_inputs(B, scalars, y)
        if not (self.check_values and B and can_inspect_values(z)):
            return
        if not bool((scalars["omega"] >= 1).all()):
            raise ValueError(f"omega (the guidance scale) must be >= 1 (1: no guidance), got "
                             f"{scalars['omega'].min().item():g}")
        if y is not None and not bool(((y >= 0) & (y <= self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is "
                             f"the null class), got values in [{y.min().item()}, {y.max().item()}]")

    def prefix_tokens(self, h, omega, t_min, t_max, y):
        """The 20 conditioning tokens (B, 20, D), in the official order, before the positions."""
        embeddings = {"class": self.y_embedder(y), "omega": self.omega_embedder(1 - 1 / omega),
                      "t_min": self.cfg_t_start_embedder(t_min),
                      "t_max": self.cfg_t_end_embedder(t_max), "time": self.h_embedder(h)}
        return torch.cat([getattr(self, f"{name}_tokens") + embeddings[name].unsqueeze(1)
                          for name, _ in TOKENS], dim=1)

    def embed(self, z, h, omega, t_min, t_max, y, ops, tz=None, th=None):
        """The token sequence (B, 20 + N, D) of the network's inputs, and with the tangents tz
        of z and th of h (B,) its tangent (the other inputs have none)."""
        if y is None:
            y = torch.full_like(h, self.num_classes, dtype=torch.long)
        prefix = self.prefix_tokens(h, omega, t_min, t_max, y)
        pos = self.pos_embed
        embed = self.x_embedder
        # the embedding takes z in the weights' dtype (a bf16 network, float32 sampler state),
        # as JiT's sampler passes it; the velocity and the update read the float32 z
        dtype = embed.proj1.weight.dtype
        args = (embed.proj1.weight, embed.proj2.weight, embed.folded_bias(),
                pos[:, self.num_prefix:])
        if tz is None:
            patches = ops.patch_embed(z.to(dtype), *args)
            return torch.cat([(prefix + pos[:, :self.num_prefix]).to(patches.dtype), patches],
                             dim=1)
        patches, t_patches = ops.patch_embed_dual(z.to(dtype), *args, tz.to(dtype))
        x = torch.cat([(prefix + pos[:, :self.num_prefix]).to(patches.dtype), patches], dim=1)
        _, t_time = self.h_embedder.forward_dual(h, th)
        t_prefix = torch.zeros_like(x[:, :self.num_prefix])
        start = self.num_prefix - dict(TOKENS)["time"]  # the time tokens come last
        t_prefix[:, start:] = t_time.unsqueeze(1).to(t_prefix.dtype)
        return x, torch.cat([t_prefix, t_patches.to(x.dtype)], dim=1)

    def readout(self, state, final, z, t, ops, head=None):
        """The final layer over the patch tokens of the blocks' output state (x, pending): the
        velocity (z - x̂)/clip(t, 0.05, 1), or head(tokens, weight, bias) of the final Linear's
        input tokens."""
        x, pending = state
        zeros = x.new_zeros(1, x.shape[-1]).expand(x.shape[0], -1)
        if pending is None:
            u = ops.rms_norm_modulate(x[:, self.num_prefix:], final.norm.weight, zeros, zeros)
        else:
            _, u = ops.gated_residual_rms_norm_modulate(x, *pending, final.norm.weight, zeros,
                                                        zeros, skip=self.num_prefix)
        if head is not None:
            return head(u, final.linear.weight, final.linear.bias)
        x_hat = ops.output_head(u, final.linear.weight, final.linear.bias, self.patch_size,
                                self.out_channels)
        return average_velocity(z, x_hat, t)

    def run(self, state, blocks, ops):
        """The blocks over state (x, pending), the last MLP update left pending."""
        x, pending = state
        zeros = x.new_zeros(1, x.shape[-1]).expand(x.shape[0], -1)
        rope = (self.rope_cos, self.rope_sin)
        for block in blocks:
            x, pending = block(x, rope, ops, zeros, pending, defer=self.fuse_across_blocks)
        return x, pending

    def forward(self, z, t, h, omega, t_min, t_max, y=None, head=None):
        self.check_inputs(z, dict(t=t, h=h, omega=omega, t_min=t_min, t_max=t_max), y)
        ops = ops_for(self.backend, z.device)
        state = self.run((self.embed(z, h, omega, t_min, t_max, y, ops), None), self.blocks, ops)
        return self.readout(state, self.u_final_layer, z, t, ops, head)

    def velocities(self, z, t, h, omega, t_min, t_max, y=None, u=True):
        """(u, v): the average velocity and the v-head's instantaneous one; with u=False v alone
        (the u-head not run). Needs the v-head."""
        self.check_v_head()
        self.check_inputs(z, dict(t=t, h=h, omega=omega, t_min=t_min, t_max=t_max), y)
        ops = ops_for(self.backend, z.device)
        trunk = self.run((self.embed(z, h, omega, t_min, t_max, y, ops), None),
                         self.shared_blocks, ops)
        v = self.readout(self.run(trunk, self.v_heads, ops), self.v_final_layer, z, t, ops)
        if not u:
            return v
        return self.readout(self.run(trunk, self.u_heads, ops), self.u_final_layer, z, t,
                            ops), v

    def forward_dual(self, z, t, h, omega, t_min, t_max, y, tz, tt, th):
        """(u, du, v): the average velocity u, its derivative du along the tangents (tz, tt, th)
        of (z, t, h) (the JVP, without gradient), and the v-head's v (no tangent); gradients
        flow through u and v. Each fused op carries value and tangent in one pass; the v-head
        runs on the trunk's value alone."""
        self.check_v_head()
        self.check_inputs(z, dict(t=t, h=h, omega=omega, t_min=t_min, t_max=t_max), y)
        ops = ops_for(self.backend, z.device)
        x, tx = self.embed(z, h, omega, t_min, t_max, y, ops, tz, th)
        zeros = x.new_zeros(1, x.shape[-1]).expand(x.shape[0], -1)
        rope = (self.rope_cos, self.rope_sin)
        defer, pending = self.fuse_across_blocks, None
        for block in self.shared_blocks:
            x, tx, pending = block.forward_dual(x, tx, rope, ops, zeros, pending, defer)
        trunk = (x, None if pending is None else pending[:2])
        v = self.readout(self.run(trunk, self.v_heads, ops), self.v_final_layer, z, t, ops)
        for block in self.u_heads:
            x, tx, pending = block.forward_dual(x, tx, rope, ops, zeros, pending, defer)
        final = self.u_final_layer
        P = self.num_prefix
        if pending is None:
            tokens, t_tokens = ops.rms_norm_modulate_dual(x[:, P:], final.norm.weight, zeros,
                                                          zeros, tx[:, P:])
        else:
            _, tokens, _, t_tokens = ops.gated_residual_rms_norm_modulate_dual(
                x, pending[0], pending[1], final.norm.weight, zeros, zeros, tx, pending[2],
                skip=P)
        u, du = ops.pmf_head_dual(tokens, final.linear.weight, final.linear.bias, z, t, t_tokens,
                                  tz, tt, self.patch_size, U_T_MIN)
        return u, du, v

    def check_v_head(self):
        if not self.has_v_head:
            raise ValueError("this PMF has no v-head (the training-only instantaneous velocity "
                             "head): build it with PMF(..., v_head=True), or load a file that "
                             "holds one with load_checkpoint(path, v_head=True)")


def average_velocity(z, x_hat, t):
    """u = (z - x̂)/clip(t, 0.05, 1), in float32: pMF's reading of the network's
    x-prediction."""
    return (z.float() - x_hat.float()) / t.float().clamp(U_T_MIN, 1.0).view(-1, 1, 1, 1)
