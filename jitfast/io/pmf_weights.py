"""pMF weights: the official port's layout, told from JiT's by its keys, converted exactly to
jitfast's ``PMF``, and the architecture read from the tensor shapes.

The published files (``pMF-{B,L,H}-{16,32}.pt``) are bare state dicts of the port's
``pixelMeanFlow``: keys ``net.`` + the ``pmfDiT`` names, linear layers wrapped as
``._flax_linear.`` / ``._flax_embedding.``, q, k, v and SwiGLU's w1, w3 as separate weights, the
RoPE table as a complex buffer ``rope_freqs``, and possibly the training-only v-head
(``v_heads.*``, ``v_final_layer.*``), which inference does not use: it is dropped, as the port's
``strict=False`` loading ignores it. tests/fixtures/pmf_official_keys.json holds the key lists the
official code makes.
"""
import re

import torch

from jitfast.io.errors import CheckpointError
from jitfast.io.layouts import state_dict_problems, strip_prefixes
from jitfast.network.pmf import PMF, TOKENS
from jitfast.network.pmf_presets import pmf_preset_of

WRAPPERS = ("._flax_linear.", "._flax_embedding.")
V_HEAD = re.compile(r"(v_heads\.\d+|v_final_layer)\.")  # training only
FIXED = re.compile(r"rope_freqs$")  # the RoPE table, made by the network
FUSED = {".attn.qkv.": (".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj."),
         ".mlp.w13.": (".mlp.w1.", ".mlp.w3.")}
MARKERS = ("class_tokens", "u_final_layer.", "shared_blocks.", "u_heads.")


def is_pmf_state(state):
    """Whether a state dict (any prefixes) holds a pMF network rather than a JiT."""
    return any(key.startswith(MARKERS) for key in strip_prefixes(state))


def pmf_from_official(state, v_head=False):
    """jitfast's PMF state dict of an official (or already jitfast-layout) one: prefixes and
    wrappers stripped, the RoPE table dropped, and the v-head too unless v_head, q/k/v and w1/w3
    concatenated."""
    out, parts = {}, {}
    for key, value in strip_prefixes(state).items():
        for wrapper in WRAPPERS:
            key = key.replace(wrapper, ".")
        if FIXED.match(key) or (V_HEAD.match(key) and not v_head):
            continue
        for fused, pieces in FUSED.items():
            index = next((i for i, piece in enumerate(pieces) if piece in key), None)
            if index is not None:
                name = key.replace(pieces[index], fused)
                parts.setdefault(name, [None] * len(pieces))[index] = value
                break
        else:
            out[key] = value
    for name, pieces in parts.items():
        if any(p is None for p in pieces):
            fused = next(f for f in FUSED if f in name)
            missing = [name.replace(fused, FUSED[fused][i]) for i, p in enumerate(pieces)
                       if p is None]
            raise CheckpointError(f"the pMF weights lack {', '.join(missing)} (needed together "
                                  f"to build {name})")
        out[name] = torch.cat(pieces, dim=0)
    return out


def _count_blocks(state, group):
    found = {int(m.group(1)) for k in state for m in [re.match(rf"{group}\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def pmf_config_from_state(state):
    """PMF keywords from the shapes of a jitfast-layout pMF state dict."""
    try:
        hidden = state["pos_embed"].shape[-1]
        proj1 = state["x_embedder.proj1.weight"]
        head_dim = state["u_heads.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = state["u_heads.0.mlp.w2.weight"].shape[1]
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        tokens = state["pos_embed"].shape[1] - sum(n for _, n in TOKENS)
    except KeyError as err:
        raise CheckpointError(f"the pMF weights lack {err.args[0]}, which every pMF network "
                              f"has: the file is incomplete or not a pMF model") from None
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise CheckpointError(f"the pMF position table holds {tokens} patch tokens, not a square "
                              f"grid: the file is not a pMF model of square images")
    shared, heads = _count_blocks(state, "shared_blocks"), _count_blocks(state, "u_heads")
    return dict(input_size=grid * proj1.shape[-1], patch_size=proj1.shape[-1],
                in_channels=proj1.shape[1], hidden_size=hidden, depth=shared + heads,
                num_heads=hidden // head_dim, num_classes=classes, head_depth=heads,
                mlp_hidden=mlp_hidden, bottleneck_dim=proj1.shape[0],
                v_head=any(V_HEAD.match(k) for k in state))


def describe(config):
    """A pMF config in words: its preset name where it has one."""
    name = pmf_preset_of(config)
    shape = (f"depth {config['depth']}, width {config['hidden_size']}, patch "
             f"{config['patch_size']}, {config['input_size']} px, {config['num_classes']} "
             f"classes")
    return f"a {name} ({shape})" if name else f"a pMF network ({shape})"


def check_pmf_state(model, state):
    """Raise one error naming every missing/unexpected key and shape mismatch."""
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"the pMF weights do not fit {describe(model.config)} — "
                              + " | ".join(problems))


def pmf_model_from_state(state, config=None, device="cpu", backend="auto", v_head=False,
                         **overrides):
    """A ready PMF (eval mode) from a pMF state dict (official or jitfast layout); its config
    from the shapes unless given (a model folder's config.json); overrides win. v_head: with the
    training-only v-head, which the file must hold (else it is not loaded)."""
    state = pmf_from_official(state, v_head)
    if v_head and not any(V_HEAD.match(k) for k in state):
        raise CheckpointError("v_head=True, but the pMF weights hold no v-head (v_heads.N.*, "
                              "v_final_layer.*): the published inference files may lack it; "
                              "load without v_head, or train one")
    config = {**(config or {}), "v_head": v_head}
    inferred = pmf_config_from_state(state)
    if config:
        clashes = {k: (v, inferred[k]) for k, v in config.items()
                   if k in inferred and inferred[k] != v}
        if clashes:
            shown = ", ".join(f"{k} {a} (weights: {b})" for k, (a, b) in clashes.items())
            raise CheckpointError(f"the stored pMF config does not fit its weights: {shown}")
    model = PMF(**{**inferred, **(config or {}), **overrides}, backend=backend)
    check_pmf_state(model, state)
    model.load_state_dict(state)
    return model.to(device).eval()


def official_pmf_state(net):
    """The published layout of the PMF `net` (``pmf_from_official`` inverted): the official
    port's ``pixelMeanFlow`` state dict, keys ``net.`` + its names, Linear and Embedding weights
    wrapped (``._flax_linear.``, ``._flax_embedding.``), q/k/v and w1/w3 split, the RoPE table as
    the port's complex ``rope_freqs`` buffer, and the v-head where `net` has one: a file the
    port's ``load_state_dict`` reads as it reads the published ones."""
    wrapped = {}
    for name, module in net.named_modules():
        wrapper = WRAPPERS[0] if isinstance(module, torch.nn.Linear) else \
            WRAPPERS[1] if isinstance(module, torch.nn.Embedding) else None
        if wrapper:
            for leaf in module._parameters:
                wrapped[f"{name}.{leaf}"] = f"{name}{wrapper}{leaf}"
    out = {}
    for key, value in net.state_dict().items():
        key = wrapped.get(key, key)
        pieces = [(key, value.detach().clone())]
        for fused, names in FUSED.items():
            if fused in key:
                pieces = [(key.replace(fused, part), chunk.clone())
                          for part, chunk in zip(names, value.chunk(len(names), dim=0))]
        out.update((f"net.{k}", v) for k, v in pieces)
    prefix = net.num_prefix
    out["net.rope_freqs"] = torch.complex(net.rope_cos[prefix:, 0::2], net.rope_sin[prefix:, 0::2])
    return out
