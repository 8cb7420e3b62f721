"""The published JiT state-dict layouts, told apart by their keys, and exact conversions.

- ``official``: LTH14/JiT's ``model_jit.JiT``, which is also jitfast's own ``JiT``.
- ``diffusers``: diffusers pull request #13098's ``JiTTransformer2DModel``: q, k, v split into
  ``attn.to_q/to_k/to_v``, ``attn.norm_q/norm_k``, ``attn.to_out.0``, the blocks' adaLN Linear
  without its ``.1``, and the final layer's parts at the top (``norm_final``, ``linear_final``,
  ``adaLN_modulation_final``).
- ``diffusers-fused``: the same with the official attention names (``attn.qkv``,
  ``attn.q_norm/k_norm``, ``attn.proj``): the pull request's earlier versions and the
  diffusers-native model of github Bili-Sakura/JiT-diffusers.
Wrapper prefixes are stripped first: ``net.`` (the official Denoiser), ``transformer.`` (the Hub
wrapper of BiliSakura/JiT-diffusers), ``module.`` (DDP), ``_orig_mod.`` (torch.compile).
tests/fixtures/published_layouts.json holds the key lists made by the published code.
"""
import re

import torch

from jitfast.io.errors import CheckpointError

PREFIXES = ("net.", "transformer.", "module.", "_orig_mod.")
LAYOUTS = ("official", "diffusers", "diffusers-fused")

# Every key of an official JiT state dict.
OFFICIAL_KEY = re.compile(
    r"pos_embed|in_context_posemb|t_embedder\.mlp\.[02]\.(weight|bias)"
    r"|y_embedder\.embedding_table\.weight"
    r"|x_embedder\.proj1\.weight|x_embedder\.proj2\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.q_norm|attn\.k_norm)\.weight"
    r"|blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.w12|mlp\.w3|adaLN_modulation\.1)\.(weight|bias)"
    r"|final_layer\.norm_final\.weight|final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)")

# (official, published) name pieces: one starting with "." is replaced inside a key, any other
# only at its start. The first piece that matches a key is the only one applied to it.
_DIFFUSERS_COMMON = (("final_layer.norm_final.", "norm_final."),
                     ("final_layer.linear.", "linear_final."),
                     ("final_layer.adaLN_modulation.1.", "adaLN_modulation_final."),
                     (".adaLN_modulation.1.", ".adaLN_modulation."))
RENAMES = {
    "official": (),
    "diffusers-fused": _DIFFUSERS_COMMON,
    "diffusers": _DIFFUSERS_COMMON + ((".attn.q_norm.", ".attn.norm_q."),
                                      (".attn.k_norm.", ".attn.norm_k."),
                                      (".attn.proj.", ".attn.to_out.0.")),
}
QKV_PARTS = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.")  # the diffusers split of .attn.qkv.


def strip_prefixes(state):
    """Remove the wrapper prefixes (any number of them, in any order) from every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _rename(key, pairs):
    for old, new in pairs:
        if old.startswith(".") and old in key:
            return key.replace(old, new, 1)
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _official_name(key, layout):
    """(official key, q/k/v part index or None) of a key in `layout`, or None if it is not one."""
    original, part = key, None
    if layout == "diffusers":
        for index, piece in enumerate(QKV_PARTS):
            if piece in key:
                key, part = key.replace(piece, ".attn.qkv.", 1), index
    official = _rename(key, [(new, old) for old, new in RENAMES[layout]])
    if not OFFICIAL_KEY.fullmatch(official) or published_names(official, layout)[part or 0] != \
            original:
        return None  # not a key of `layout` (an official name that `layout` renames, e.g.)
    return official, part


def published_names(key, layout):
    """The names in `layout` of an official key (three for a diffusers q/k/v)."""
    if layout == "diffusers" and ".attn.qkv." in key:
        return [_rename(key.replace(".attn.qkv.", piece, 1), RENAMES[layout])
                for piece in QKV_PARTS]
    return [_rename(key, RENAMES[layout])]


def foreign_keys_note(keys):
    """" (k1, k2 in no published JiT layout: ...)" for the keys no published layout has (after
    the wrapper prefixes), or "" when there are none: for error messages."""
    foreign = sorted(k for k in keys
                     if all(_official_name(k, layout) is None for layout in LAYOUTS))
    if not foreign:
        return ""
    shown = ", ".join(foreign[:12]) + (f" and {len(foreign) - 12} more" if foreign[12:] else "")
    return f" ({shown} in no published JiT layout: {', '.join(LAYOUTS)})"


def state_dict_problems(expected, state, note=lambda keys: ""):
    """Phrases naming every missing and unexpected key of `state` and every shape mismatch
    against a model's state dict `expected` (none: it fits); note(keys) follows the unexpected
    ones."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}" + note(unexpected))
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    return problems


def detect_layout(keys):
    """The layout that explains the most keys (ties: the order of LAYOUTS), and the keys it
    does not explain."""
    unmatched = {layout: [k for k in keys if _official_name(k, layout) is None]
                 for layout in LAYOUTS}
    best = min(LAYOUTS, key=lambda layout: len(unmatched[layout]))
    return best, unmatched[best]


def to_official(state):
    """The official-layout state dict of `state` (prefixes stripped, layout detected from the
    keys, q/k/v concatenated back); keys in no layout are kept as they are, for the state-dict
    check to name."""
    state = strip_prefixes(state)
    layout, _ = detect_layout(list(state))
    out, parts = {}, {}
    for key, value in state.items():
        name = _official_name(key, layout)
        if name is None:
            out[key] = value
        elif name[1] is None:
            out[name[0]] = value
        else:
            parts.setdefault(name[0], [None] * 3)[name[1]] = value
    for key, pieces in parts.items():
        if any(p is None for p in pieces):
            missing = [key.replace(".attn.qkv.", QKV_PARTS[i], 1)
                       for i, p in enumerate(pieces) if p is None]
            raise CheckpointError(f"the {layout} weights lack {', '.join(missing)} (q, k and v "
                                  f"are needed together to rebuild {key})")
        out[key] = torch.cat(pieces, dim=0)
    return out


def from_official(state, layout):
    """An official-layout state dict (no prefixes) renamed into `layout`, q/k/v split."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = {}
    for key, value in state.items():
        names = published_names(key, layout)
        pieces = value.chunk(3, dim=0) if len(names) == 3 else (value,)
        out.update((name, piece.contiguous()) for name, piece in zip(names, pieces))
    return out
