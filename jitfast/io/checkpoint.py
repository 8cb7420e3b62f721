"""Checkpoints in the official JiT layout, read safely.

A checkpoint is a dict with ``model``, ``model_ema1``, ``model_ema2`` (Denoiser state dicts, keys
prefixed ``net.``), ``optimizer``, ``epoch`` and ``args`` (an argparse.Namespace in official
files). Files are read with ``torch.load(weights_only=True)`` plus an allow-list for Namespace:
a file that needs arbitrary unpickling is refused, never executed. jitfast adds ``config``, the
model's constructor keywords as plain data, so custom configurations load exactly.
.safetensors files, diffusers-format folders and the other published key layouts are read
through jitfast.weights, into the same checkpoint dict.
"""
import argparse
import os
import pickle
import re

import torch

from jitfast.io.configs import check_config_fits, shape_facts
from jitfast.io.errors import CheckpointError
from jitfast.io.layouts import foreign_keys_note, state_dict_problems, to_official
from jitfast.io.pmf_weights import describe, is_pmf_state, pmf_config_from_state, \
    pmf_from_official, pmf_model_from_state
from jitfast.io.weight_files import checkpoint_from_folder, checkpoint_from_safetensors
from jitfast.network.model import JiT
from jitfast.network.presets import ARCHITECTURES, preset_config
from jitfast.util.files import atomic_write

WEIGHT_KEYS = {"ema1": "model_ema1", "ema2": "model_ema2", "ema3": "model_ema3", "model": "model"}
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file safely (weights only), turning every failure into a clear error.
    A .safetensors file or a diffusers-format folder is read without pickle (jitfast.weights)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (a Hub repo id goes to "
                                f"JiT.from_pretrained)")
    if os.path.isdir(path):
        return checkpoint_from_folder(path)
    if path.endswith(".safetensors"):
        return checkpoint_from_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path!r} is empty (0 bytes): the save was interrupted or the "
                              f"copy failed; use an earlier checkpoint")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise CheckpointError(f"{path!r} is not a PyTorch checkpoint (it starts with {head!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it references {found.group(1)}" if found else str(err).splitlines()[0]
        raise CheckpointError(
            f"{path!r} refused: loading it would need arbitrary unpickling ({what}). Only "
            f"tensors, plain Python data and argparse.Namespace are allowed. If you trust the "
            f"file, re-save just its tensors: torch.save({{'model': ckpt['model']}}, new_path)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path!r} is truncated or corrupt and cannot be read ({err}); "
                              f"re-download it or use an earlier checkpoint") from None


def training_setting(ckpt, name, default):
    """A value of the checkpoint's training args (official Namespace or jitfast dict)."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def select_weights(ckpt, weights=None):
    """The network state dict of `weights` ("ema1" | "ema2" | "ema3" | "model") from a loaded file;
    None: "ema1" from a training checkpoint, the one set of a file that holds one."""
    if weights is not None and weights not in WEIGHT_KEYS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_KEYS)}, got {weights!r}")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"not a JiT checkpoint: the file holds a {type(ckpt).__name__}, "
                              f"not a dict")
    if all(torch.is_tensor(v) for v in ckpt.values()) and ckpt:
        if weights not in (None, "model"):
            raise CheckpointError(f"the file is a bare state dict with no EMA weights; load it "
                                  f"with weights='model' (asked for {weights!r})")
        return network_state(ckpt)
    if "holds" in ckpt:  # a safetensors file or folder of one weight set
        if weights is not None and ckpt["holds"] not in (None, weights):
            raise CheckpointError(f"the file holds the {ckpt['holds']!r} weights only; load it "
                                  f"with weights={ckpt['holds']!r} (asked for {weights!r})")
        return network_state(ckpt["model"])
    key = WEIGHT_KEYS[weights or "ema1"]
    if key not in ckpt:
        present = [w for w, k in WEIGHT_KEYS.items() if k in ckpt]
        raise CheckpointError(f"the checkpoint has no {key!r} entry for weights={weights!r}; "
                              f"it holds weights {present} (entries: {sorted(ckpt)})")
    return network_state(ckpt[key])


def weights_in_use(ckpt, weights=None):
    """The name of the set ``select_weights(ckpt, weights)`` reads: `weights`, or for None
    "ema1" of a training checkpoint and the set a one-set file holds ("model" if unnamed)."""
    if weights is not None:
        return weights
    one_set = ckpt and all(torch.is_tensor(v) for v in ckpt.values())
    if one_set or "holds" in ckpt:
        return ckpt.get("holds") or "model"
    return "ema1"


def network_state(state):
    """A JiT state dict in the official layout (``to_official``); pMF weights as they are."""
    return state if is_pmf_state(state) else to_official(state)


def infer_config(state, ckpt=None, **overrides):
    """JiT constructor keywords: the stored config, else the tensor shapes (plus the official
    args); `overrides` win over both."""
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(stored, dict):  # a config.json may leave fields to the shapes
        check_config_fits(stored, state)
        return infer_config(state, {"args": ckpt.get("args")}, **{**stored, **overrides})
    facts = {k: value for k, (value, _) in shape_facts(state).items()}
    hidden, mlp_hidden = facts["hidden_size"], facts.pop("mlp_hidden")
    config = dict(facts, mlp_ratio=mlp_hidden * 1.5 / hidden)
    if int(int(hidden * 4.0) * 2 / 3) == mlp_hidden:
        config["mlp_ratio"] = 4.0
    config.update(overrides)
    if "in_context_start" not in config:
        config["in_context_start"] = _in_context_start(config, ckpt)
    return config


def _in_context_start(config, ckpt):
    """Not visible in the shapes: from the official args' preset name, else a matching preset."""
    if config["in_context_len"] == 0:
        return 0
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    name = getattr(args, "model", None) or (args.get("model") if isinstance(args, dict) else None)
    if isinstance(name, str):
        try:
            return preset_config(name)["in_context_start"]
        except KeyError:
            pass
    shape = (config["depth"], config["hidden_size"], config["num_heads"],
             config["bottleneck_dim"], config["in_context_len"])
    for arch in ARCHITECTURES.values():
        if arch[:5] == shape:
            return arch[5]
    raise CheckpointError(f"cannot infer in_context_start for a model of depth {shape[0]}, "
                          f"hidden {shape[1]}: pass it, load_checkpoint(path, "
                          f"in_context_start=N)")


def check_state_dict(model, state):
    """Raise one error naming every missing/unexpected key and every shape mismatch."""
    problems = state_dict_problems(model.state_dict(), state, foreign_keys_note)
    if problems:
        raise CheckpointError("the state dict does not fit the model — " + " | ".join(problems))


def load_checkpoint(path, weights=None, device="cpu", backend="auto", family=None, **overrides):
    """A ready network (eval mode) from an official or jitfast checkpoint, or a bare state dict:
    a ``JiT``, or a ``PMF`` for pixel MeanFlow weights (the published ``pMF-*.pt`` files).

    weights: "ema1" (what the JiT paper samples with), "ema2", "ema3" (pMF runs) or "model"; None (default):
    "ema1" from a training checkpoint, else the file's one weight set. The architecture is
    inferred from the tensor shapes; keyword overrides (e.g. in_context_start) win. family
    ("JiT" | "pMF"): refuse a file of the other family. v_head=True (pMF): load the
    training-only v-head too (``PMF(..., v_head=True)``), which the file must hold.
    """
    return model_from_checkpoint(read_checkpoint(path), weights, device, backend, family,
                                 **overrides)


def model_family(state):
    """"pMF" or "JiT": which network a state dict (any layout) holds."""
    return "pMF" if is_pmf_state(state) else "JiT"


def model_from_checkpoint(ckpt, weights=None, device="cpu", backend="auto", family=None,
                          **overrides):
    """``load_checkpoint`` for a checkpoint already read with ``read_checkpoint``."""
    state = select_weights(ckpt, weights)
    found = model_family(state)
    if family not in (None, found):
        what = describe(pmf_config_from_state(pmf_from_official(state))) if found == "pMF" \
            else "a JiT network"
        loader = "jitfast.PMF" if found == "pMF" else "jitfast.JiT"
        raise CheckpointError(f"the file holds {what}, not a {family} network: load it with "
                              f"{loader}.from_pretrained or jitfast.load_checkpoint")
    if found == "pMF":
        return pmf_model_from_state(state, ckpt.get("config"), device, backend, **overrides)
    if "v_head" in overrides:
        raise CheckpointError("v_head is pMF's training head; the file holds a JiT network")
    model = JiT(**infer_config(state, ckpt, **overrides), backend=backend)
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model.to(device).eval()


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a
    crash mid-write leaves the previous file intact; a failed write raises WriteError."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, denoiser, ema=None, optimizer=None, epoch=0, args=None, **extra):
    """Write the official layout (+ ``config`` and any extra plain-data entries) atomically."""
    ckpt = {"model": denoiser.state_dict(), "epoch": epoch,
            "config": dict(denoiser.net.config)}
    if ema is not None:
        for k in range(1, ema.sets + 1):
            ckpt[f"model_ema{k}"] = ema.state_dict(k)
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if args is not None:
        ckpt["args"] = args
    ckpt.update(extra)
    atomic_save(ckpt, path)
