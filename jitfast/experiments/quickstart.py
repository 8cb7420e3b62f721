"""How good is a training run's sample grid? The judges of ``classifier`` on the grid the run
drew (the PNG a user looks at) and on more samples drawn the same way, against real images:
class accuracy, and the Fréchet distance in the judge's features (the FID of this scale).

The figure of merit is the ratio of a judge's accuracy on the samples to its accuracy on real
images. On the built-in Fashion-MNIST subset: three judges (seeds 0-1-2) trained on images of
Fashion-MNIST's test split, which no model trains on, the ratio and the distance given as mean ±
std over them. On the built-in shapes: the colour-blind judge (every class of the shapes has its
own colour, so a colour judge scores blobs of the right hue high; the colour-blind one needs the
shape).

    python -m jitfast.experiments.quickstart runs/jitfast [--samples-per-class 30]

Writes RUN/quickstart.json. The judges are trained once per resolution (a few minutes on the
2-core CPU) and kept in --judges.
"""
import argparse
import json
import os
import sys
import time

import torch

from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.experiments import mean_std
from jitfast.experiments.classifier import fashion_judges, trained_judges
from jitfast.io.checkpoint import CheckpointError, read_checkpoint, training_setting
from jitfast.io.images import load_png
from jitfast.training.families import family_of
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
    """The classes of the training grid's rows (evenly spaced, as ``training.grid.sample_grid``)."""
    return torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()


def run_samples(ckpt, per_class, seed, overrides=None, weights="ema1"):
    """Class-conditional samples of the checkpoint's `weights` (EMA 1, as the grid), with its
    training grid's sampler (its family's: JiT's ODE, pMF's one step); `overrides` {argument:
    value} replace the run's (sample_cfg, sample_interval, ...)."""
    overrides = overrides or {}
    setting = lambda name, default: overrides.get(name, training_setting(ckpt, name, default))
    denoiser = denoiser_from_checkpoint(ckpt, weights, backend="torch")
    classes = ckpt["config"]["num_classes"]
    labels = torch.arange(classes).repeat_interleave(per_class)
    settings = family_of(setting("model", "JiT-B/16")).sampling(setting)
    with torch.no_grad():
        images = denoiser.generate(labels, generator=torch.Generator().manual_seed(seed),
                                   **settings)
    return images, labels


def run_judges(ckpt, size, folder):
    """({name: Judge} for the data the checkpoint was trained on, the names whose ratio is the
    figure of merit)."""
    own_data = training_setting(ckpt, "data_path", None)
    dataset = None if own_data else training_setting(ckpt, "dataset", "shapes")
    if dataset == "fashion-mnist":
        judges = fashion_judges(size, REAL_IMAGES, cache=folder)
        judges = {f"judge {seed}": judge for seed, judge in judges.items()}
        return judges, list(judges)
    if dataset == "shapes":
        return trained_judges(size, REAL_IMAGES, cache=folder), ["colour-blind"]
    raise ValueError(f"the run trained on {own_data!r}: judges exist for the built-in datasets "
                     f"only (--dataset fashion-mnist or shapes)")


def score_run(run, per_class=30, judges_folder="runs/judges", seed=1000, overrides=None,
              weights="ema1"):
    """{"grid", "samples", "real"}: each {judge: {"accuracy", "frechet"}}; "ratio" and
    "frechet": for grid and samples the mean and std over the judges of merit of the accuracy
    ratio (samples / real) and the distance; for the latest checkpoint of the run folder `run`
    and the grid drawn at its step. overrides, weights: of the samples (``run_samples``; the grid
    is EMA 1's)."""
    path = latest_checkpoint(run)
    ckpt = read_checkpoint(path)
    size, columns = ckpt["config"]["input_size"], training_setting(ckpt, "samples_per_class", 8)
    step = int(os.path.basename(path).split("-")[1].split(".")[0])
    grid_path = os.path.join(run, f"samples-{step:08d}.png")
    if not os.path.exists(grid_path):
        raise FileNotFoundError(f"{grid_path}: the run's grid at step {step} is missing (a run "
                                f"draws it after its last step)")
    judges, merit = run_judges(ckpt, size, judges_folder)
    tiles, rows = grid_tiles(load_png(grid_path), size, columns)
    grid_labels = grid_classes(int(rows.max()) + 1, ckpt["config"]["num_classes"])[rows]
    images, labels = run_samples(ckpt, per_class, seed, overrides, weights)
    result = {"checkpoint": path, "grid_png": grid_path,
              "grid": {name: j.score(tiles, grid_labels) for name, j in judges.items()},
              "samples": {name: j.score(images, labels) for name, j in judges.items()},
              "real": {name: j.reference() for name, j in judges.items()},
              "samples_per_class": per_class, "real_images": REAL_IMAGES, "merit": merit}
    for kind in ("grid", "samples"):
        result[f"{kind}_ratio"] = mean_std([result[kind][name]["accuracy"]
                                            / result["real"][name]["accuracy"]
                                            for name in merit])
        result[f"{kind}_frechet"] = mean_std([result[kind][name]["frechet"] for name in merit])
    return result


def report(result):
    names = list(result["real"])
    lines = [f"{'':8}" + "".join(f" {name + ' acc':>16} {name + ' FD':>16}" for name in names)]
    for kind in ("grid", "samples", "real"):
        lines.append(f"{kind:8}" + "".join(f" {result[kind][n]['accuracy']:16.3f} "
                                           f"{result[kind][n]['frechet']:16.2f}" for n in names))
    merit = result["merit"]
    floor = sum(result["real"][n]["frechet"] for n in merit) / len(merit)
    for kind, what in (("grid", "the run's grid"),
                       ("samples", f"{result['samples_per_class']} samples per class")):
        ratio, distance = result[f"{kind}_ratio"], result[f"{kind}_frechet"]
        lines.append(f"{what}: accuracy ratio (samples / real, {', '.join(merit)}) "
                     f"{ratio['mean']:.3f} ± {ratio['std']:.3f}, Fréchet distance "
                     f"{distance['mean']:.2f} ± {distance['std']:.2f} (real vs real {floor:.2f})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.experiments.quickstart",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run folder (python -m jitfast.train --out)")
    p.add_argument("--samples-per-class", type=int, default=30,
                   help="samples per class drawn beside the grid")
    p.add_argument("--judges", default="runs/judges", help="folder of the trained judges")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--sample-cfg", type=float, default=None,
                   help="the samples' guidance scale (JiT's CFG, pMF's omega); default: the "
                        "run's grid's")
    p.add_argument("--sample-interval", type=float, nargs=2, default=None,
                   help="the samples' guidance interval; default: the run's grid's")
    p.add_argument("--weights", default="ema1", choices=("ema1", "ema2", "ema3", "model"),
                   help="the weights the samples are drawn with (the grid is EMA 1's)")
    p.add_argument("--out", default=None, help="the JSON written; default: RUN/quickstart.json")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("sample_cfg", "sample_interval")
                 if getattr(args, k) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        result = score_run(args.run, args.samples_per_class, args.judges, overrides=overrides,
                           weights=args.weights)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["overrides"], result["weights"] = overrides, args.weights
    with open(args.out or os.path.join(args.run, "quickstart.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))


if __name__ == "__main__":
    main()
