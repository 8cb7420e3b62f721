"""Weights without pickle: .safetensors files and diffusers-format folders.

A folder is a model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or its
sharded ``.index.json``) or a pipeline folder holding one in ``transformer/``. Only the config
and the tensors are read: no code shipped in a folder (the Hub repos carry remote code) is ever
imported or run. Readers return a checkpoint dict like ``read_checkpoint``'s: a weight set per
entry (``model``, ``model_ema1``, ...), ``config`` (JiT keywords) when the folder has one, and
``holds`` (the name of the set, where known) for a file of one set.
"""
import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from jitfast.io.errors import CheckpointError
from jitfast.io.families import family_of_folder
from jitfast.io.layouts import strip_prefixes
from jitfast.util.files import atomic_write

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
SETS = ("model", "model_ema1", "model_ema2", "model_ema3")  # a training file's sets (pMF keeps
# three EMAs, JiT two), as key prefixes


def read_safetensors(path):
    """(tensors, metadata) of one .safetensors file, with every failure a clear error."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path!r} is not a readable .safetensors file ({err}); "
                              f"re-download it or use another copy") from None


def checkpoint_from_safetensors(path):
    """A .safetensors file: jitfast's training weights (sets ``model.``, ``model_ema1.``, ...
    with the config in the metadata) or one state dict in any published layout."""
    tensors, metadata = read_safetensors(path)
    ckpt = {"config": json.loads(metadata["config"])} if "config" in metadata else {}
    sets = {s: {k[len(s) + 1:]: v for k, v in tensors.items() if k.startswith(s + ".")}
            for s in SETS}
    if metadata.get("jitfast_sets") or all(k.split(".", 1)[0] in SETS for k in tensors):
        return {**ckpt, **{s: state for s, state in sets.items() if state}}
    return {**ckpt, "model": tensors, "holds": metadata.get("weights")}


def model_folder(path):
    """The folder holding config.json + weights: `path` itself or its transformer/."""
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) or \
                os.path.isfile(os.path.join(folder, INDEX_NAME)):
            return folder
    found = sorted(os.listdir(path))[:12]
    raise CheckpointError(
        f"{path!r} is a folder with no JiT weights: expected {WEIGHTS_NAME} (or {INDEX_NAME}) "
        f"beside a {CONFIG_NAME}, or a transformer/ subfolder holding them (a pipeline folder); "
        f"it holds {found or 'nothing'}. Pass a checkpoint file or such a folder")


def checkpoint_from_folder(path):
    """A diffusers-format model or pipeline folder, as a checkpoint dict of one weight set."""
    folder = model_folder(path)
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        ckpt = checkpoint_from_safetensors(os.path.join(folder, WEIGHTS_NAME))
    else:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(folder, shard))[0])
        ckpt = {"model": state, "holds": None}
    config_path = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            fields = json.load(f)
        ckpt["config"] = family_of_folder(fields).config_from_fields(fields, config_path)
    return ckpt


def save_safetensors(tensors, path, **metadata):
    """Tensors (made contiguous, on the CPU, unshared) to `path` atomically; metadata as text."""
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = save(plain, metadata={"format": "pt", **text})
    atomic_write(path, lambda f: f.write(data))


def save_training_weights(path, states, config):
    """The weight sets of a training checkpoint (``model``, ``model_ema1``, ...: objectives'
    state dicts) as one .safetensors, keys ``<set>.<official key>``, the model's config
    in the metadata: the run's weights, shareable without pickle."""
    tensors = {f"{s}.{k}": v for s in SETS if s in states
               for k, v in strip_prefixes(states[s]).items()}
    save_safetensors(tensors, path, config=config, jitfast_sets=",".join(s for s in SETS
                                                                         if s in states))
