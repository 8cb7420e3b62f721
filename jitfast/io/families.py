"""Each model family's weights as the io layer sees them: how a state dict is told to be the
family's, put in its canonical layout, described, built into a ready network, and written in the
family's published layouts. Loading (``io/checkpoint.py``), model folders (``io/pretrained.py``,
``io/weight_files.py``) and ``convert`` ask the family of the weights instead of branching; a new
family is one more object in FAMILIES (docs/design.md)."""
import os

import torch

from jitfast.io.configs import diffusers_config, jit_config
from jitfast.io.errors import CheckpointError
from jitfast.io.jit_weights import jit_model_from_state
from jitfast.io.layouts import from_official, strip_prefixes, to_official
from jitfast.io.pmf_weights import (V_HEAD, describe, is_pmf_state, official_pmf_state,
                                    pmf_config_from_state, pmf_from_official,
                                    pmf_model_from_state)
from jitfast.util.files import atomic_write

# a training checkpoint's weight sets: the name users give (--weights) and the file's entry
WEIGHT_KEYS = {"ema1": "model_ema1", "ema2": "model_ema2", "ema3": "model_ema3", "model": "model"}


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a
    crash mid-write leaves the previous file intact; a failed write raises WriteError."""
    atomic_write(path, lambda f: torch.save(obj, f))


def jitfast_folder(net):
    """(config.json fields, state dict) of jitfast's model folder: the constructor keywords."""
    return {"_class_name": type(net).__name__, **net.config}, net.state_dict()


class JiTWeights:
    """JiT: the official layout (and diffusers' and the Hub's, converted on reading)."""
    name, loader, class_name = "JiT", "jitfast.JiT", "JiT"
    layouts = ("official", "diffusers", "jitfast")
    OFFICIAL_SETS = ("model", "ema1", "ema2")  # the official checkpoint's

    def holds(self, state):
        """Every state dict no other family claims (its errors name the keys that do not fit)."""
        return True

    def network_state(self, state):
        return to_official(state)

    def describe(self, state):
        return "a JiT network"

    def config_from_fields(self, fields, source):
        return jit_config(fields, source)

    def model(self, state, ckpt, device, backend, **overrides):
        return jit_model_from_state(state, ckpt, device, backend, **overrides)

    def keep_all(self, state):
        """Loading keywords that keep everything the weights hold: none for JiT."""
        return {}

    def folder(self, net, layout):
        if layout == "jitfast":
            return jitfast_folder(net)
        return diffusers_config(net.config), from_official(net.state_dict(), "diffusers")

    def write_official(self, net, sets, dst):
        """The .pth the official code loads: model, model_ema1, model_ema2 (Denoiser keys under
        ``net.``) from `sets` ({weights name: state}), a copy of `net`'s weights for those
        missing (as the Hub's converter does); a `dst` not ending in .pth is a folder, written
        as dst/checkpoint-last.pth, the file the official ``--resume DST`` reads. Returns (path,
        the sets copied)."""
        copied = [name for name in self.OFFICIAL_SETS if name not in sets]
        sets = {**{name: net.state_dict() for name in copied}, **sets}
        out = {WEIGHT_KEYS[name]: {f"net.{k}": v for k, v in sets[name].items()}
               for name in self.OFFICIAL_SETS}
        if not os.fspath(dst).endswith(".pth"):
            os.makedirs(dst, exist_ok=True)
            dst = os.path.join(dst, "checkpoint-last.pth")
        atomic_save({**out, "config": dict(net.config)}, dst)
        return dst, copied


class PMFWeights:
    """Pixel MeanFlow: the official port's published layout (``io/pmf_weights.py``)."""
    name, loader, class_name = "pMF", "jitfast.PMF", "PMF"
    layouts = ("official", "jitfast")

    def holds(self, state):
        return is_pmf_state(state)

    def network_state(self, state):
        return state

    def describe(self, state):
        return describe(pmf_config_from_state(pmf_from_official(state)))

    def config_from_fields(self, fields, source):
        return {k: v for k, v in fields.items() if not k.startswith("_")}

    def model(self, state, ckpt, device, backend, **overrides):
        return pmf_model_from_state(state, ckpt.get("config"), device, backend, **overrides)

    def keep_all(self, state):
        """The v-head too, where the weights hold one."""
        return {"v_head": any(V_HEAD.match(k) for k in strip_prefixes(state))}

    def folder(self, net, layout):
        return jitfast_folder(net)

    def write_official(self, net, sets, dst):
        """One .pt (or .pth) holding the bare state dict of the official port's
        ``pixelMeanFlow``, as the published pMF-*.pt files do (`net`'s weights, its v-head where
        it has one). Returns (path, no sets copied)."""
        if not os.fspath(dst).endswith((".pt", ".pth")):
            raise CheckpointError(f"pMF weights in the official layout are one file, as the "
                                  f"published pMF-*.pt are: give a DST ending in .pt, not "
                                  f"{dst!r}")
        atomic_save(official_pmf_state(net), dst)
        return dst, []


FAMILIES = (PMFWeights(), JiTWeights())  # asked in order: JiT, the fallback, last


def family_of_state(state):
    """The family whose network a state dict (any layout) holds."""
    return next(family for family in FAMILIES if family.holds(state))


def family_of_folder(fields):
    """The family of a model folder's config.json fields: jitfast's own folders name the class
    (``_class_name`` "JiT" or "PMF"); the published ones (diffusers', the Hub's) hold JiT."""
    return next((family for family in FAMILIES if fields.get("_class_name") == family.class_name),
                FAMILIES[-1])


def family_named(name):
    """The family of a name ("JiT" | "pMF": a network's ``family``)."""
    for family in FAMILIES:
        if name == family.name:
            return family
    raise ValueError(f"no model family {name!r}: one of {[f.name for f in FAMILIES]}")
