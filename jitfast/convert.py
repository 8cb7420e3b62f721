"""Convert JiT weights between the published layouts.

    python -m jitfast.convert SRC DST --layout official|diffusers|jitfast [--weights ema1]

SRC is anything ``load_checkpoint`` reads (an official or jitfast .pth/.pt, a .safetensors, a
diffusers-format model or pipeline folder, keys in any published layout), or a training run's
folder (its latest checkpoint). Layouts of DST:
- official: JiT: a .pth that the official code loads (``model``, ``model_ema1``, ``model_ema2``,
  Denoiser keys under ``net.``); a DST that does not end in .pth is a folder, written as
  DST/checkpoint-last.pth, the file the official ``--resume DST`` reads. Sets the source lacks get
  a copy of --weights' set, as the Hub's own converter does. pMF: a .pt (or .pth) holding the
  bare state dict of the official PyTorch port's ``pixelMeanFlow``, as the published pMF-*.pt
  files do (the --weights set, the v-head included where the source has one).
- diffusers: a folder that diffusers pull request #13098's ``JiTTransformer2DModel`` loads.
- jitfast: a folder for ``JiT.from_pretrained`` (or ``PMF.from_pretrained``: pixel MeanFlow
  weights, such as the published pMF-*.pt files, convert to this layout only).
"""
import argparse
import glob
import os
import sys

from jitfast.io.checkpoint import (WEIGHT_KEYS, CheckpointError, atomic_save, model_family,
                                   model_from_checkpoint, read_checkpoint, select_weights,
                                   weights_in_use)
from jitfast.io.layouts import strip_prefixes
from jitfast.io.pmf_weights import V_HEAD as PMF_V_HEAD
from jitfast.io.pmf_weights import official_pmf_state
from jitfast.io.pretrained import save_pretrained
from jitfast.training.runfolder import CHECKPOINT_GLOB, latest_checkpoint

LAYOUTS = ("official", "diffusers", "jitfast")
OFFICIAL_SETS = ("model", "ema1", "ema2")  # the official JiT checkpoint's


def official_checkpoint(ckpt, weights, **overrides):
    """The official checkpoint dict of every weight set of `ckpt` (missing ones: `weights`')."""
    chosen = model_from_checkpoint(ckpt, weights, **overrides)  # checks keys, shapes, config
    sets = {}
    for name in OFFICIAL_SETS:
        try:
            sets[WEIGHT_KEYS[name]] = select_weights(ckpt, name)
        except CheckpointError:
            pass
    copied = [WEIGHT_KEYS[name] for name in OFFICIAL_SETS if WEIGHT_KEYS[name] not in sets]
    for entry in copied:
        sets[entry] = chosen.state_dict()
    out = {entry: {f"net.{k}": v for k, v in state.items()} for entry, state in sets.items()}
    return {**out, "config": dict(chosen.config)}, copied


def convert(src, dst, layout, weights=None, **overrides):
    """Write `src`'s weights to `dst` in `layout`; returns the path written. weights: the set
    to convert (None: "ema1" of a training checkpoint, a one-set file's own)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if os.path.isdir(src) and glob.glob(os.path.join(src, CHECKPOINT_GLOB)):
        src = latest_checkpoint(src)  # a training run's folder
    ckpt = read_checkpoint(src)
    if model_family(select_weights(ckpt, weights)) == "pMF" and layout != "jitfast":
        return official_pmf_file(ckpt, src, dst, layout, weights)
    if layout != "official":
        net = model_from_checkpoint(ckpt, weights, **overrides)
        return save_pretrained(net, dst, layout, weights_in_use(ckpt, weights))
    out, copied = official_checkpoint(ckpt, weights, **overrides)
    if copied:
        print(f"the source has no {', '.join(copied)}: they hold a copy of its "
              f"{weights or 'ema1'} weights")
    if not os.fspath(dst).endswith(".pth"):
        os.makedirs(dst, exist_ok=True)
        dst = os.path.join(dst, "checkpoint-last.pth")
    atomic_save(out, dst)
    return dst


def official_pmf_file(ckpt, src, dst, layout, weights):
    """Write pMF weights in the official port's published layout to the file `dst`."""
    if layout != "official":
        raise CheckpointError(f"{src!r} holds pixel MeanFlow weights, which have no {layout!r} "
                              f"layout: convert them with --layout official (the published "
                              f"pMF-*.pt layout) or --layout jitfast (a safetensors folder for "
                              f"PMF.from_pretrained)")
    if not os.fspath(dst).endswith((".pt", ".pth")):
        raise CheckpointError(f"pMF weights in the official layout are one file, as the "
                              f"published pMF-*.pt are: give a DST ending in .pt, not {dst!r}")
    state = select_weights(ckpt, weights)
    v_head = any(PMF_V_HEAD.match(k) for k in strip_prefixes(state))
    atomic_save(official_pmf_state(model_from_checkpoint(ckpt, weights, v_head=v_head)), dst)
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="weights: a .pth/.pt/.safetensors file or a model folder")
    parser.add_argument("dst", help="where to write (a folder; official: a .pth or a folder)")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--weights", default=None, choices=sorted(WEIGHT_KEYS),
                        help="the weight set to convert (official: the one that fills sets the "
                             "source lacks); default: ema1 of a training checkpoint, the one "
                             "set of a file that holds one")
    parser.add_argument("--in-context-start", type=int, default=None,
                        help="only for weights whose in-context start no config or preset tells")
    args = parser.parse_args(argv)
    overrides = {} if args.in_context_start is None else \
        {"in_context_start": args.in_context_start}
    try:
        print(f"wrote {convert(args.src, args.dst, args.layout, args.weights, **overrides)}")
    except (CheckpointError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
