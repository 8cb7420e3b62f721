"""config.json files of the published layouts, as jitfast.JiT keywords, checked against the
tensor shapes.

Field names: jitfast's own (the JiT keywords); diffusers pull request #13098's
(``sample_size``, ``num_layers``, ``num_attention_heads``, ``attention_dropout``, ``dropout``,
...); the Hub wrapper's (``model_type`` a preset name, ``sample_size`` / ``image_size``,
``num_class_embeds`` / ``num_classes``, ``attention_dropout`` / ``attn_dropout``, ``dropout`` /
``proj_dropout``). Where a file gives two names of one keyword, the first non-null in FIELDS wins,
as in the Hub wrapper's code. A preset name gives the architecture; explicit fields override it.
"""
import math

from jitfast.io.errors import CheckpointError
from jitfast.io.layouts import foreign_keys_note
from jitfast.network.presets import preset_config

FIELDS = {
    "input_size": ("input_size", "image_size", "sample_size"),
    "patch_size": ("patch_size",),
    "in_channels": ("in_channels",),
    "hidden_size": ("hidden_size",),
    "depth": ("depth", "num_layers"),
    "num_heads": ("num_heads", "num_attention_heads"),
    "mlp_ratio": ("mlp_ratio",),
    "attn_drop": ("attn_drop", "attn_dropout", "attention_dropout"),
    "proj_drop": ("proj_drop", "proj_dropout", "dropout"),
    "num_classes": ("num_classes", "num_class_embeds"),
    "bottleneck_dim": ("bottleneck_dim",),
    "in_context_len": ("in_context_len",),
    "in_context_start": ("in_context_start",),
    "attn_scores_fp32": ("attn_scores_fp32",),
}
PRESET_FIELDS = ("model_name", "model_type", "model")
NORM_EPS = 1e-6  # the official RMSNorm's, fixed in jitfast


def jit_config(fields, source="config.json"):
    """JiT keywords from the fields of a config.json (any published naming)."""
    preset = next((fields[f] for f in PRESET_FIELDS if fields.get(f) is not None), None)
    config = {}
    if preset is not None:
        try:
            config = preset_config(preset)
        except KeyError as err:
            raise CheckpointError(f"{source}: model_type {preset!r} is not a JiT preset "
                                  f"({err.args[0]})") from None
    for keyword, names in FIELDS.items():
        value = next((fields[n] for n in names if fields.get(n) is not None), None)
        if value is not None:
            config[keyword] = value
    eps = fields.get("norm_eps")
    if eps is not None and not math.isclose(eps, NORM_EPS):
        raise CheckpointError(f"{source}: norm_eps {eps} is not supported; JiT's RMSNorm uses "
                              f"{NORM_EPS}")
    return config


def diffusers_config(config):
    """The config.json fields of diffusers pull request #13098 for JiT keywords `config`."""
    names = dict(input_size="sample_size", depth="num_layers", num_heads="num_attention_heads",
                 attn_drop="attention_dropout", proj_drop="dropout")
    fields = {"_class_name": "JiTTransformer2DModel"}
    fields.update((names.get(k, k), v) for k, v in config.items()
                  if k != "attn_scores_fp32")
    fields["norm_eps"] = NORM_EPS
    return fields


def shape_facts(state):
    """What the tensor shapes of an official-layout state dict say: {keyword: (value, tensors)}
    (and the SwiGLU hidden size, "mlp_hidden")."""
    def shape(key):
        if key not in state:
            raise CheckpointError(f"not a JiT state dict: key {key!r} is missing "
                                  f"(found {len(state)} keys, e.g. {sorted(state)[:5]})"
                                  + foreign_keys_note(state))
        return tuple(state[key].shape)

    def of(key):
        return f"{key} {shape(key)}"

    pos, proj1, table = shape("pos_embed"), shape("x_embedder.proj1.weight"), \
        shape("y_embedder.embedding_table.weight")
    head_dim = shape("blocks.0.attn.q_norm.weight")[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    in_context = state.get("in_context_posemb")
    return dict(
        hidden_size=(pos[-1], of("pos_embed")),
        input_size=(math.isqrt(pos[1]) * proj1[-1],
                    f"{of('pos_embed')} and {of('x_embedder.proj1.weight')}"),
        patch_size=(proj1[-1], of("x_embedder.proj1.weight")),
        in_channels=(proj1[1], of("x_embedder.proj1.weight")),
        bottleneck_dim=(proj1[0], of("x_embedder.proj1.weight")),
        depth=(depth, f"blocks.0 to blocks.{depth - 1}"),
        num_heads=(pos[-1] // head_dim, of("blocks.0.attn.q_norm.weight")),
        num_classes=(table[0] - 1, of("y_embedder.embedding_table.weight")),
        in_context_len=(0, "no in_context_posemb") if in_context is None else
        (in_context.shape[1], of("in_context_posemb")),
        mlp_hidden=(shape("blocks.0.mlp.w12.weight")[0] // 2, of("blocks.0.mlp.w12.weight")))


def check_config_fits(config, state):
    """Raise naming the field and the tensor where a stored config disagrees with the shapes."""
    facts = shape_facts(state)
    problems = [f"{k}={config[k]} ({' / '.join(FIELDS[k])}) but the weights say {value} "
                f"({tensor})"
                for k, (value, tensor) in facts.items() if k in config and config[k] != value]
    if "mlp_ratio" in config:
        hidden = config.get("hidden_size", facts["hidden_size"][0])
        value, tensor = facts["mlp_hidden"]
        if int(int(hidden * config["mlp_ratio"]) * 2 / 3) != value:
            problems.append(f"mlp_ratio={config['mlp_ratio']} gives a SwiGLU hidden size of "
                            f"{int(int(hidden * config['mlp_ratio']) * 2 / 3)}, but {tensor} "
                            f"gives {value}")
    if problems:
        raise CheckpointError("the config disagrees with the weights: " + "; ".join(problems))
