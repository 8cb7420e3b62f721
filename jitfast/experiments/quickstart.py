"""How good is a training run's sample grid? Both judges of ``classifier`` on the grid the run
drew (the PNG a user looks at) and on more samples drawn the same way, against real images.

The quick start's figure of merit is the colour-blind ratio: the colour-blind judge's accuracy on
the samples over its accuracy on real images. Every class of the built-in data has its own
colour, so the colour judge scores blobs of the right hue high; the colour-blind one needs the
shape.

    python -m jitfast.experiments.quickstart runs/jitfast [--samples-per-class 30]

Writes RUN/quickstart.json. The judges are trained once per resolution (about 5 minutes on the
2-core CPU at 64 px) and kept in --judges.
"""
import argparse
import json
import os
import sys
import time

import torch

from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.experiments.classifier import trained_judges
from jitfast.io.checkpoint import CheckpointError, read_checkpoint, training_setting
from jitfast.io.images import load_png
from jitfast.training.runfolder import latest_checkpoint

REAL_IMAGES = 300  # real images per reference: the judges' accuracy on them, and the floor


def grid_tiles(grid, size, columns):
    """(images (B, 3, size, size) in [-1, 1], row index (B,)) of a grid PNG's tiles, row-major,
    as ``jitfast.io.images.image_grid`` laid them out."""
    rows, width = grid.shape[0] // size, grid.shape[1] // size
    if (grid.shape[0] % size or grid.shape[1] % size or width != columns
            or grid.shape[2] != 3):
        raise ValueError(f"a grid of shape {grid.shape} is not {columns} columns of {size}-px "
                         f"RGB tiles")
    tiles = torch.from_numpy(grid.copy()).reshape(rows, size, columns, size, 3)
    tiles = tiles.permute(0, 2, 4, 1, 3).reshape(rows * columns, 3, size, size)
    return tiles.float() / 127.5 - 1, torch.arange(rows).repeat_interleave(columns)


def grid_classes(rows, num_classes):
    """The classes of the training grid's rows (evenly spaced, as ``train.sample_grid``)."""
    return torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()


def run_samples(ckpt, per_class, seed):
    """Class-conditional samples of the checkpoint's EMA-1, with its training grid's sampler."""
    setting = lambda name, default: training_setting(ckpt, name, default)
    denoiser = denoiser_from_checkpoint(ckpt, "ema1", backend="torch")
    classes = ckpt["config"]["num_classes"]
    labels = torch.arange(classes).repeat_interleave(per_class)
    with torch.no_grad():
        images = denoiser.generate(
            labels, steps=setting("sample_steps", 50), method=setting("sample_method", "heun"),
            cfg=setting("sample_cfg", 4.0), schedule=setting("sample_schedule", "linear"),
            generator=torch.Generator().manual_seed(seed))
    return images, labels


def score_run(run, per_class=30, judges_folder="runs/judges", seed=1000):
    """{"grid", "samples", "real"}: each {judge: {"accuracy", "frechet"}}, plus the colour-blind
    ratios, for the latest checkpoint of the run folder `run` and the grid drawn at its step."""
    path = latest_checkpoint(run)
    ckpt = read_checkpoint(path)
    size, columns = ckpt["config"]["input_size"], training_setting(ckpt, "samples_per_class", 8)
    step = int(os.path.basename(path).split("-")[1].split(".")[0])
    grid_path = os.path.join(run, f"samples-{step:08d}.png")
    if not os.path.exists(grid_path):
        raise FileNotFoundError(f"{grid_path}: the run's grid at step {step} is missing (a run "
                                f"draws it after its last step)")
    judges = trained_judges(size, REAL_IMAGES, cache=judges_folder)
    tiles, rows = grid_tiles(load_png(grid_path), size, columns)
    grid_labels = grid_classes(int(rows.max()) + 1, ckpt["config"]["num_classes"])[rows]
    images, labels = run_samples(ckpt, per_class, seed)
    result = {"checkpoint": path, "grid_png": grid_path,
              "grid": {name: j.score(tiles, grid_labels) for name, j in judges.items()},
              "samples": {name: j.score(images, labels) for name, j in judges.items()},
              "real": {name: j.reference() for name, j in judges.items()},
              "samples_per_class": per_class, "real_images": REAL_IMAGES}
    real = result["real"]["colour-blind"]["accuracy"]
    for kind in ("grid", "samples"):
        result[f"{kind}_colour_blind_ratio"] = result[kind]["colour-blind"]["accuracy"] / real
    return result


def report(result):
    lines = [f"{'':10} {'colour acc':>10} {'colour FD':>10} {'blind acc':>10} {'blind FD':>10}"]
    for kind in ("grid", "samples", "real"):
        c, b = result[kind]["colour"], result[kind]["colour-blind"]
        lines.append(f"{kind:10} {c['accuracy']:10.3f} {c['frechet']:10.1f} "
                     f"{b['accuracy']:10.3f} {b['frechet']:10.1f}")
    lines.append("colour-blind ratio (samples / real): grid "
                 f"{result['grid_colour_blind_ratio']:.3f}"
                 f", {result['samples_per_class']} per class "
                 f"{result['samples_colour_blind_ratio']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.experiments.quickstart",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run folder (python -m jitfast.train --out)")
    p.add_argument("--samples-per-class", type=int, default=30,
                   help="samples per class drawn beside the grid")
    p.add_argument("--judges", default="runs/judges", help="folder of the trained judges")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        result = score_run(args.run, args.samples_per_class, args.judges)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.run, "quickstart.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))


if __name__ == "__main__":
    main()
