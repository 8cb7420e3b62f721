"""JiT: the "Just image Transformer" of Li & He (2025), state-dict compatible with the official
``model_jit.JiT``. Every elementwise/normalisation op goes through the backend chosen in
``jitfast.network.backend``; big matmuls stay in ``nn.Linear``.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from jitfast.functional.positions import rope_2d, sincos_2d
from jitfast.network.alignment import PaddedSwiGLU
from jitfast.network.attention import attention
from jitfast.network.backend import check_backend, ops_for


def frequencies(t, dim, max_period=10000):
    """The (1, dim/2) frequencies of the sinusoid, on t's device (a host tensor copied over would
    crash CUDA-graph capture)."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    return torch.exp(-math.log(max_period) * steps / half)[None]


def timestep_embedding(t, dim=256, max_period=10000):
    """(B,) times -> (B, dim) sinusoid, cosine half first."""
    args = t[:, None].float() * frequencies(t, dim, max_period)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # a bf16 model takes bf16

    def forward_dual(self, t, tt):
        """(embedding, its tangent along tt (B,)): the tangent without gradient."""
        out = self.forward(t)
        with torch.no_grad():
            freqs = frequencies(t, self.frequency_embedding_size)
            args = t[:, None].float() * freqs
            t_freq = torch.cat([-torch.sin(args), torch.cos(args)], dim=-1) * freqs.repeat(1, 2)
            first, second = self.mlp[0], self.mlp[2]
            dtype = first.weight.dtype
            a = first(timestep_embedding(t, self.frequency_embedding_size).to(dtype)).float()
            sig = torch.sigmoid(a)
            ta = torch.nn.functional.linear((t_freq * tt[:, None].float()).to(dtype),
                                            first.weight).float()
            tangent = torch.nn.functional.linear((sig * (1 + a * (1 - sig)) * ta).to(dtype),
                                                 second.weight)
        return out, tangent


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class (index num_classes) used for CFG."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class BottleneckPatchEmbed(nn.Module):
    """Holds the two patch-embedding weights; the op itself is ``ops.patch_embed``."""

    def __init__(self, patch_size, in_chans, bottleneck_dim, embed_dim):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, bottleneck_dim, patch_size, patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, embed_dim, 1, 1, bias=True)


class RMSNorm(nn.Module):
    """Holds an RMSNorm weight; the normalisation runs inside the fused ops that consume it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def active(dropout):
    """Whether a dropout module (or None) drops anything in this mode."""
    return dropout is not None and dropout.p > 0 and dropout.training


def deferred_bias(linear, x, dropout=None, weight=None):
    """(x·Wᵀ, b): `linear` (with `weight` in place of its own, if given) without its bias, which
    the fused op consuming its output adds (its gradient then comes from that op's backward, not
    from a pass over the Linear's output gradient); with an active `dropout` after the Linear,
    that dropout of the biased output and None."""
    weight = linear.weight if weight is None else weight
    if active(dropout):
        return dropout(F.linear(x, weight, linear.bias)), None
    return F.linear(x, weight), linear.bias


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0, scores_fp32=False):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.scores_fp32 = scores_fp32
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope, ops):
        """The attention update and the bias still to add to it (``deferred_bias``)."""
        B, N, D = x.shape
        # the bias in the matmul's epilogue, as the official Linear adds it; its gradient from
        # the rows the op's backward reads anyway (ops.bias_gradient_here)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias.detach())
        q, k, v = ops.qk_norm_rope(qkv, self.num_heads, self.q_norm.weight, self.k_norm.weight,
                                   *rope, bias=self.qkv.bias)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, dropout_p, self.scores_fp32).transpose(1, 2).reshape(B, N, D)
        return deferred_bias(self.proj, out, self.proj_drop)


class SwiGLUFFN(nn.Module, PaddedSwiGLU):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        hidden_dim = int(hidden_dim * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        self.ffn_dropout = nn.Dropout(drop)

    def unpadded(self):
        return self.w12.weight, self.w12.bias, self.w3.weight

    def forward(self, x, ops):
        """The MLP update and the bias still to add to it (``deferred_bias``), the hidden width
        padded to a multiple of 8 (``PaddedSwiGLU``)."""
        w12, b12, w3 = self.swiglu_weights()
        if active(self.ffn_dropout):  # the fused matmuls have no dropout between them
            hidden = ops.swiglu(F.linear(x, w12), bias=b12)
            return deferred_bias(self.w3, self.ffn_dropout(hidden), weight=w3)
        return ops.swiglu_mlp(x, w12, b12, w3), self.w3.bias


def adaln(hidden_size, chunks):
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class JiTBlock(nn.Module):
    """x += g1·Attn(mod(RMSNorm(x))); x += g2·SwiGLU(mod(RMSNorm(x))), with the six adaLN
    vectors (B, 6D) = ``adaLN_modulation(c)``, or given precomputed (``JiT.conditioning``).

    Each residual update is added in one pass with the norm that reads its result, so that the
    residual stream feeds one op and its gradient is summed inside that op's backward, not by a
    separate add: the MLP's update, when the block returns it as `pending` (h, gate, bias),
    is added by the next block's first norm (or the final layer's)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0,
                 scores_fp32=False):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attn_drop, proj_drop, scores_fp32)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio), proj_drop)
        self.adaLN_modulation = adaln(hidden_size, 6)

    def forward(self, x, c, rope, ops, modulation=None, pending=None, defer=False):
        """c: the conditioning (B, D); modulation: adaLN_modulation(c), if the caller has it.
        (Computed here, inside forward, where FSDP has gathered this block's weights.)
        pending: the previous block's MLP update (h, gate, bias), not yet added to x. Returns
        (x, pending): with defer, this block's MLP update is left pending, else added (None)."""
        if modulation is None:
            modulation = self.adaLN_modulation(c)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        if pending is None:
            u = ops.rms_norm_modulate(x, self.norm1.weight, shift1, scale1)
        else:
            h, gate, bias = pending
            x, u = ops.gated_residual_rms_norm_modulate(x, h, gate, self.norm1.weight, shift1,
                                                        scale1, h_bias=bias)
        h, bias = self.attn(u, rope, ops)
        x, u = ops.gated_residual_rms_norm_modulate(x, h, gate1, self.norm2.weight, shift2,
                                                    scale2, h_bias=bias)
        h, bias = self.mlp(u, ops)
        if defer:
            return x, (h, gate2, bias)
        return ops.gated_residual(x, h, gate2, bias), None


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaln(hidden_size, 2)

    def forward(self, x, c, ops, head=None, modulation=None, pending=None, skip=0):
        """RMSNorm and modulation (shift, scale = adaLN_modulation(c), or `modulation` (B, 2D)
        when given) of the tokens of x from `skip` on (after the last block's pending update
        (h, gate, bias), if any), then the Linear and the unpatchify to NCHW, or
        head(u, weight, bias) of the modulated tokens u and the Linear's parameters."""
        if modulation is None:
            modulation = self.adaLN_modulation(c)
        shift, scale = modulation.chunk(2, dim=-1)
        if pending is None:
            u = ops.rms_norm_modulate(x[:, skip:], self.norm_final.weight, shift, scale)
        else:
            h, gate, bias = pending
            _, u = ops.gated_residual_rms_norm_modulate(x, h, gate, self.norm_final.weight,
                                                        shift, scale, h_bias=bias, skip=skip)
        if head is not None:
            return head(u, self.linear.weight, self.linear.bias)
        return ops.output_head(u, self.linear.weight, self.linear.bias, self.patch_size,
                               self.out_channels)


class Conditioning(NamedTuple):
    """What the network computes from (t, y) alone, row i for example i: the in-context tokens
    (B, in_context_len, D: the label embedding plus their position table; None without them),
    c = t_emb + y_emb (B, D), and each block's six adaLN vectors (B, 6D) and the final layer's
    two (B, 2D) — or None for those, which the blocks then compute from c. A sampler whose times
    and labels are known in advance computes it all once per trajectory and passes rows of it to
    every evaluation."""
    context: torch.Tensor
    c: torch.Tensor
    blocks: tuple = None
    final: torch.Tensor = None

    def rows(self, index):
        """The conditioning of rows `index` (an int, a slice, ...) of every tensor."""
        pick = (lambda x: None if x is None else x[index])
        return Conditioning(pick(self.context), self.c[index],
                            None if self.blocks is None else tuple(map(pick, self.blocks)),
                            pick(self.final))


def check_geometry(input_size, patch_size, hidden_size, num_heads):
    """Raise a ValueError unless the patches tile the image and a head's dim suits 2-D RoPE."""
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must give a head "
                         f"dim divisible by 4 (2-D RoPE rotates pairs in two halves)")


def check_image_batch(x, name, channels, size, hint=""):
    """Raise a ValueError/TypeError unless x is a floating (B, channels, size, size) batch."""
    expected = (channels, size, size)
    if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a (B, {channels}, {size}, {size}) image batch for this "
                         f"model, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (images in [-1, 1]), got "
                        f"{x.dtype}{hint}")


def check_batch_inputs(B, scalars, y):
    """Raise a ValueError unless each of `scalars` ({name: tensor}) is a floating (B,) tensor
    and y is None or an integer (B,) tensor."""
    for name, value in scalars.items():
        if not torch.is_tensor(value) or tuple(value.shape) != (B,) \
                or not value.is_floating_point():
            got = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) \
                else type(value).__name__
            raise ValueError(f"{name} must be a floating-point tensor of shape ({B},), got {got}")
    if y is not None and (not torch.is_tensor(y) or tuple(y.shape) != (B,)
                          or y.is_floating_point() or y.dtype == torch.bool):
        got = f"{tuple(y.shape)} {y.dtype}" if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of shape ({B},), got {got}")


def can_inspect_values(tensor):
    """Value checks need a host sync: skip them while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


class JiT(nn.Module):
    """Just image Transformer. ``forward(x, t, y)`` returns the network output for noisy images
    x (B, C, H, W), times t (B,) in [0, 1] and labels y (B,) in [0, num_classes] (the last being
    the null class; y=None is the null class for every example: unconditional); under the
    default training objective it is the x-prediction. num_classes=0 makes an unconditional
    model: its label table holds the null class alone.

    ``forward(x, t, y, head)`` replaces the output head (the final Linear and the unpatchify) by
    ``head(u, weight, bias)`` of its input tokens u (B, N, D) and the Linear's parameters, so that
    a caller can fuse its epilogue into the head (``jitfast.kernels.output_head_v_loss``); it
    runs inside forward, so module hooks (FSDP's parameter gathering) still apply.

    Beyond the official keywords: ``backend`` ("torch" | "triton" | "auto") selects the op
    implementations, ``attn_scores_fp32`` computes attention scores in float32 as the official
    code does, and ``check_values`` (attribute, default True) enables the t/label range checks,
    which cost a host sync per call (they are skipped inside torch.compile and graph capture);
    ``fuse_across_blocks`` (attribute, default True) runs work that spans blocks in one place:
    each block's last residual update is left to the next block's first fused op (see
    ``JiTBlock``), and every block's adaLN vectors come from one matmul before the first block
    (``modulations``). FSDP2, which gathers a block's weights only inside its forward and frees
    them after, needs it off (``jitfast.training.build`` sets it).
    """

    family = "JiT"
    forward_methods = ()  # called in place of forward (FSDP2 hooks them too): none

    @property
    def sharding_units(self):
        """The modules FSDP2 shards one by one (the rest is the root's): the blocks."""
        return tuple(self.blocks)

    def example_inputs(self, batch, device=None, dtype=None):
        """forward's tensor arguments by name, a batch of `batch` (``torch.export``'s example)."""
        size = self.input_size
        return dict(x=torch.zeros(batch, self.in_channels, size, size, device=device, dtype=dtype),
                    t=torch.full((batch,), 0.5, device=device),
                    y=torch.zeros(batch, dtype=torch.long, device=device))

    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=1024, depth=24,
                 num_heads=16, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, num_classes=1000,
                 bottleneck_dim=128, in_context_len=32, in_context_start=8, backend="auto",
                 attn_scores_fp32=False):
        super().__init__()
        check_geometry(input_size, patch_size, hidden_size, num_heads)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        if in_context_len > 0 and not 0 <= in_context_start < depth:
            raise ValueError(f"in_context_start {in_context_start} must lie in [0, depth={depth})")
        self.backend = check_backend(backend)
        self.config = dict(  # the architecture, as stored in checkpoints (backend excluded)
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            attn_drop=attn_drop, proj_drop=proj_drop, num_classes=num_classes,
            bottleneck_dim=bottleneck_dim, in_context_len=in_context_len,
            in_context_start=in_context_start, attn_scores_fp32=attn_scores_fp32)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.check_values = True
        self.fuse_across_blocks = True
        grid = input_size // patch_size

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        head_dim = hidden_size // num_heads
        for name, prefix in (("rope", 0), ("rope_in_context", in_context_len)):
            cos, sin = rope_2d(head_dim, grid, prefix)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)
        middle = range(depth // 4, depth // 4 * 3)  # dropout only in the middle half
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio,
                     attn_drop if i in middle else 0.0, proj_drop if i in middle else 0.0,
                     attn_scores_fp32)
            for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.hidden_size, self.input_size // self.patch_size))
        if self.in_context_len > 0:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):  # like nn.Linear
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for param in (self.final_layer.adaLN_modulation[-1].weight,
                      self.final_layer.adaLN_modulation[-1].bias,
                      self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(param)

    def check_inputs(self, x, t, y):
        """Raise a ValueError/TypeError that says what was expected and what was given."""
        check_image_batch(x, "x", self.in_channels, self.input_size,
                          "; convert with x.float() / 127.5 - 1 for uint8 images")
        B = x.shape[0]
        check_batch_inputs(B, dict(t=t), y)
        if not (self.check_values and can_inspect_values(x)):
            return
        if B and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item():g}, "
                             f"{t.max().item():g}]")
        if y is not None and B and not bool(((y >= 0) & (y <= self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is "
                             f"the null class), got values in [{y.min().item()}, {y.max().item()}]")

    def conditioning(self, t, y, modulations=True):
        """The ``Conditioning`` of times t (B,) and labels y (B,); with modulations=False
        without the adaLN vectors, which the blocks compute in their forward (FSDP gathers a
        sharded block's weights there, and only there)."""
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        context = y_emb.unsqueeze(1) + self.in_context_posemb if self.in_context_len else None
        if not modulations:
            return Conditioning(context, c)
        *blocks, final = self.modulations(c)
        return Conditioning(context, c, tuple(blocks), final)

    def modulations(self, c):
        """Every block's six adaLN vectors (B, 6D) and the final layer's two (B, 2D), from SiLU(c)
        computed once. With gradients, by all the adaLN Linears' weights stacked: one matmul
        forward, one per grad backward and no per-block sums of c's grad, about 12 launches in
        all where one Linear per block took 12 each. Without, each Linear reads its own weight
        (stacking would copy them all, for no backward)."""
        linears = [block.adaLN_modulation[1] for block in self.blocks]
        linears.append(self.final_layer.adaLN_modulation[1])
        s = F.silu(c)
        if not torch.is_grad_enabled():
            return tuple(linear(s) for linear in linears)
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.cat([linear.bias for linear in linears])
        return F.linear(s, weight, bias).split([linear.out_features for linear in linears], -1)

    def forward(self, x, t, y=None, head=None, cond=None, noise=None, noise_scale=1.0):
        """y=None: the null class (unconditional). ``cond``: ``conditioning(t, y)``, when the
        caller has it already. With `noise` (a standard-normal draw shaped like x), x is the
        clean images and the network's input is z = t·x + (1 - t)·noise_scale·noise, formed
        inside the patch embedding (the training objective's; z never reaches memory)."""
        self.check_inputs(x, t, y)
        ops = ops_for(self.backend, x.device)
        if cond is None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            cond = self.conditioning(t, y, modulations=self.fuse_across_blocks)
        modulations = cond.blocks or (None,) * len(self.blocks)
        # the residual stream starts in the matmuls' dtype (bf16 under autocast, as the official
        # code's: its `x += pos_embed` keeps the conv's dtype) and turns float32 where the
        # float32 in-context tokens join it
        x = ops.patch_embed(x, self.x_embedder.proj1.weight, self.x_embedder.proj2.weight,
                            self.x_embedder.proj2.bias, self.pos_embed, noise,
                            None if noise is None else t, noise_scale, in_matmul_dtype=True)
        pending = None  # the last block's MLP update, added by the next fused norm
        for i, (block, modulation) in enumerate(zip(self.blocks, modulations)):
            if self.in_context_len > 0 and i == self.in_context_start:
                if pending is not None:
                    x = ops.gated_residual(x, *pending)
                    pending = None
                x = torch.cat([cond.context, x], dim=1)
            if i < self.in_context_start:
                rope = (self.rope_cos, self.rope_sin)
            else:
                rope = (self.rope_in_context_cos, self.rope_in_context_sin)
            x, pending = block(x, cond.c, rope, ops, modulation, pending,
                               defer=self.fuse_across_blocks)
        return self.final_layer(x, cond.c, ops, head, cond.final, pending,
                                skip=self.in_context_len)
