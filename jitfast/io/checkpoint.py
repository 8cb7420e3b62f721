"""Checkpoints in the official JiT layout, read safely.

A checkpoint is a dict with ``model``, ``model_ema1``, ``model_ema2`` (Denoiser state dicts, keys
prefixed ``net.``), ``optimizer``, ``epoch`` and ``args`` (an argparse.Namespace in official
files). Files are read with ``torch.load(weights_only=True)`` plus an allow-list for Namespace:
a file that needs arbitrary unpickling is refused, never executed. jitfast adds ``config``, the
model's constructor keywords as plain data, so custom configurations load exactly.
.safetensors files, diffusers-format folders and the other published key layouts are read
through jitfast.io.weight_files, into the same checkpoint dict.
"""
import argparse
import os
import pickle
import re

import torch

from jitfast.io.errors import CheckpointError
from jitfast.io.families import WEIGHT_KEYS, atomic_save, family_of_state
from jitfast.io.weight_files import checkpoint_from_folder, checkpoint_from_safetensors

ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file safely (weights only), turning every failure into a clear error.
    A .safetensors file or a diffusers-format folder is read without pickle (io/weight_files.py)."""
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
    """A state dict in its family's canonical layout (JiT's: the official keys)."""
    return family_of_state(state).network_state(state)


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


def model_from_checkpoint(ckpt, weights=None, device="cpu", backend="auto", family=None,
                          **overrides):
    """``load_checkpoint`` for a checkpoint already read with ``read_checkpoint``."""
    state = select_weights(ckpt, weights)
    found = family_of_state(state)
    if family not in (None, found.name):
        raise CheckpointError(f"the file holds {found.describe(state)}, not a {family} network: "
                              f"load it with {found.loader}.from_pretrained or "
                              f"jitfast.load_checkpoint")
    return found.model(state, ckpt, device, backend, **overrides)


def save_checkpoint(path, denoiser, ema=None, optimizer=None, epoch=0, args=None, **extra):
    """Write a Denoiser's weights, its EMAs' and the optimizer's state in the official layout
    (+ ``config`` and any extra plain-data entries) atomically."""
    states = {"model": denoiser.state_dict()}
    for k in range(1, ema.sets + 1 if ema is not None else 1):
        states[f"model_ema{k}"] = ema.state_dict(k)
    if optimizer is not None:
        states["optimizer"] = optimizer.state_dict()
    write_checkpoint(path, states, denoiser.net.config, epoch, args, **extra)


def write_checkpoint(path, states, config, epoch=0, args=None, **extra):
    """The one checkpoint writer: `states` (the entries ``model``, ``model_ema1``, ...,
    ``optimizer``), ``epoch``, the network's ``config`` (its constructor keywords), ``args``
    and any extra plain-data entries, atomically."""
    ckpt = {**states, "epoch": epoch, "config": dict(config)}
    if args is not None:
        ckpt["args"] = args
    atomic_save({**ckpt, **extra}, path)
