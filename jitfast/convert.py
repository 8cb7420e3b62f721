"""Convert JiT or pMF weights between the published layouts (which a family has, and how its
official file is written, its weights' family says: ``jitfast.io.families``).

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
  weights have this layout and the official one, not diffusers').
"""
import argparse
import glob
import os
import sys

from jitfast.io.checkpoint import WEIGHT_KEYS, CheckpointError, read_checkpoint
from jitfast.io.conversion import convert_weights
from jitfast.training.runfolder import CHECKPOINT_GLOB, latest_checkpoint

LAYOUTS = ("official", "diffusers", "jitfast")


def convert(src, dst, layout, weights=None, **overrides):
    """Write `src`'s weights to `dst` in `layout`; returns the path written. weights: the set
    to convert (None: "ema1" of a training checkpoint, a one-set file's own)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if os.path.isdir(src) and glob.glob(os.path.join(src, CHECKPOINT_GLOB)):
        src = latest_checkpoint(src)  # a training run's folder
    path, copied = convert_weights(read_checkpoint(src), dst, layout, weights, src, **overrides)
    if copied:
        print(f"the source has no {', '.join(copied)}: they hold a copy of its "
              f"{weights or 'ema1'} weights")
    return path


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
