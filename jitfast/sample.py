"""Sample images from a JiT or pMF checkpoint: PNG files, a grid, an ADM-layout .npz, optional
FID/IS.

A pixel MeanFlow (pMF) checkpoint (the published pMF-*.pt files) samples with pMF's own
few-step rule, one network evaluation per step (--steps 1 by default); its --cfg and --interval
are the network's guidance inputs, in pMF's convention: --cfg 7.0 --interval 0.2 0.7 means the
official --cfg-omega 7.0 --interval-min 0.2 --interval-max 0.7 (pMF's time: t = 1 is noise).

Image i's starting noise is drawn from its own seed (seed, i), and batches have fixed
boundaries, so an interrupted run continues where it stopped (finished batches are skipped,
PNGs are written atomically) and gives the same images as an uninterrupted one.
"""
import argparse
import json
import os

import numpy as np
import torch

from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.diffusion.sampling import METHODS, SCHEDULES
from jitfast.io.checkpoint import WEIGHT_KEYS, read_checkpoint, weights_in_use
from jitfast.io.images import image_grid, load_png, save_png, to_uint8
from jitfast.measure.fid import EvaluationError, check_fid_inputs, fid_and_inception_score
from jitfast.network.families import PRESET_DIFFERENCES
from jitfast.training.progress import Progress
from jitfast.training.runfolder import FolderLock, RunFolderError, command_line
from jitfast.util.files import (WriteError, atomic_write, atomic_write_json,
                                report_size_limit_as_error)

GRID_IMAGES = 64
DEFAULT_CFG = 2.9  # guidance scale of class-conditional JiT checkpoints unless --cfg says
# settings that change the images: a folder is resumed only with the same ones
RUN_SETTINGS = ("ckpt", "weights", "labels", "cfg", "interval", "steps", "method", "batch",
                "seed", "noise_scale", "t_eps", "dtype", "schedule")


class SampleError(ValueError):
    """Bad sampling input, with what is wrong and what to do."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--ckpt", required=True, help="checkpoint file or model folder (any published layout)")
    add("--weights", default=None, choices=sorted(WEIGHT_KEYS),
        help="weights to use; default: ema1 of a training checkpoint, the one set of a file "
             "that holds one (a published pMF file)")
    add("--model", default=None,
        help="assert the checkpoint is this preset, e.g. JiT-B/16 or pMF-L/16")
    add("--classes", default=None, help="comma-separated class ids; default: every class")
    add("--num-per-class", type=int, default=None, help="images per class; default: 1")
    add("--num-samples", type=int, default=None,
        help="images of an unconditional checkpoint (trained without classes, which takes no "
             f"--classes, --num-per-class or --cfg); default: {GRID_IMAGES}, one grid")
    add("--cfg", type=float, default=None,
        help=f"classifier-free guidance scale; default: {DEFAULT_CFG}, 1 (none) for an "
             f"unconditional checkpoint. pMF: the guidance scale omega the network takes (pMF's "
             f"--cfg-omega); default: its preset's (the pMF README's)")
    add("--interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
        help="guidance applies for LO < t < HI (LO = 0: t < HI); default: 0.1 1.0. pMF: the "
             "guidance interval the network takes, in pMF's time, t = 1 noise (its "
             "--interval-min/max); default: its preset's")
    add("--steps", type=int, default=None,
        help="ODE steps; default: 50 (JiT), 1 (pMF: one evaluation per step)")
    add("--method", default=None, choices=METHODS,
        help="ODE solver: heun/euler (official; heun takes 2·steps - 1 evaluations) or an "
             "exponential method, one evaluation per step (docs/samplers.md); default: heun. "
             "pMF has its own update and takes none")
    add("--schedule", default=None, choices=tuple(SCHEDULES),
        help="time grid of the exponential methods (heun/euler: linear only); default: linear")
    add("--batch", type=int, default=64, help="images per network batch")
    add("--seed", type=int, default=0, help="image i starts from the noise of seed (seed, i)")
    add("--noise-scale", type=float, default=None,
        help="noise std; default: the checkpoint's training setting, else 1.0 (2.0 from 512 px)")
    add("--t-eps", type=float, default=None,
        help="clamp of 1 - t in the velocity; default: the checkpoint's training setting, "
             "else 0.05 (JiT only)")
    add("--out", required=True, help="output folder (an existing run in it is resumed)")
    add("--device", default=None, help="default: cuda when available, else cpu")
    add("--dtype", default=None, choices=("fp32", "bf16"),
        help="network precision (the ODE state is always float32); default: bf16 on cuda")
    add("--no-graphs", action="store_true", help="do not replay steps from CUDA graphs")
    add("--fid", action="store_true", help="compute FID and IS with torch-fidelity")
    add("--fid-stats", default=None, help="reference statistics .npz (official fid_stats/*)")
    add("--inception-weights", default=None,
        help="local Inception weights for torch-fidelity (when it cannot download them)")
    return p.parse_args(argv)


def check_preset(net, name):
    """Refuse a checkpoint whose network is not the preset `name` (--model)."""
    family = name.split("-", 1)[0]
    if family != net.family:
        raise SampleError(f"the checkpoint is not a {name}: it holds a {net.family} network")
    try:
        differences = PRESET_DIFFERENCES[family](net.config, name)
    except KeyError as err:
        raise SampleError(f"--model: {err.args[0]}") from None
    diffs = [f"{k} {ours} (preset: {theirs})" for k, (ours, theirs) in differences.items()]
    if diffs:
        raise SampleError(f"the checkpoint is not a {name}: " + ", ".join(diffs))


def sample_labels(args, num_classes, default_cfg=DEFAULT_CFG):
    """(labels of the images, guidance scale) of the command line for a checkpoint of
    num_classes classes; an unconditional one (0 classes) samples the null class, unguided."""
    if num_classes:
        if args.num_samples is not None:
            raise SampleError(f"--num-samples is for unconditional checkpoints; this one has "
                              f"{num_classes} classes: use --classes and --num-per-class")
        per_class = 1 if args.num_per_class is None else args.num_per_class
        labels = class_labels(args.classes, per_class, num_classes)
        return labels, default_cfg if args.cfg is None else args.cfg
    given = [flag for flag, value in (("--classes", args.classes),
                                      ("--num-per-class", args.num_per_class)) if value is not None]
    if args.cfg not in (None, 1):
        given.append(f"--cfg {args.cfg:g} (guidance needs classes)")
    if given:
        raise SampleError(f"the checkpoint is unconditional (trained without classes): drop "
                          f"{', '.join(given)}; --num-samples N sets how many images")
    count = GRID_IMAGES if args.num_samples is None else args.num_samples
    if count < 1:
        raise SampleError(f"--num-samples must be >= 1, got {count}")
    return [0] * count, 1.0


def class_labels(classes, num_per_class, num_classes):
    if num_per_class < 1:
        raise SampleError(f"--num-per-class must be >= 1, got {num_per_class}")
    try:
        ids = list(range(num_classes)) if classes is None else \
            [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        raise SampleError(f"--classes must be comma-separated integers, got {classes!r}") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad or not ids:
        raise SampleError(f"class ids must lie in [0, {num_classes - 1}] for this checkpoint, "
                          f"got {bad or 'none'}")
    return [c for c in ids for _ in range(num_per_class)]  # class-major, as the official


def prepare_out(out, settings):
    """Create the folder (checking it is writable) and resume only a run of the same settings."""
    images = os.path.join(out, "images")
    try:
        os.makedirs(images, exist_ok=True)
        probe = os.path.join(out, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise SampleError(f"cannot write to the output folder {out!r}: {err.strerror}; choose "
                          f"another --out") from None
    manifest = os.path.join(out, "run.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            previous = json.load(f)
        previous.setdefault("schedule", "linear")  # manifests from before schedules existed
        changed = [k for k in RUN_SETTINGS if previous.get(k) != settings[k]]
        if changed:
            raise SampleError(f"{out!r} holds a run with other settings ({', '.join(changed)}); "
                              f"use another --out, or the same settings to resume it")
    else:
        atomic_write_json(manifest, settings)
    return images


def initial_noise(indices, shape, seed):
    """Standard-normal start of each image from its own generator: batch-size independent.
    (torch's CPU generator keeps 32 bits of a seed, so (seed, i) is hashed into 32 bits.)"""
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in indices]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def write_samples(args):
    """Sample the checkpoint into --out (PNGs, grid, npz; FID/IS with --fid), resuming a run of
    the same settings there; returns the npz path."""
    if args.fid and not args.fid_stats:
        raise SampleError("--fid needs --fid-stats, the reference statistics .npz")
    if args.fid:
        check_fid_inputs(args.fid_stats, args.inception_weights)
    if args.batch < 1:
        raise SampleError(f"--batch must be >= 1, got {args.batch}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ckpt = read_checkpoint(args.ckpt)
    denoiser = denoiser_from_checkpoint(
        ckpt, args.weights, device, dtype=torch.bfloat16 if dtype == "bf16" else None,
        noise_scale=args.noise_scale, t_eps=args.t_eps)
    net = denoiser.net
    if args.model:
        check_preset(net, args.model)
    try:
        options = denoiser.run_options(args.steps, args.method, args.schedule, args.interval)
    except ValueError as err:
        raise SampleError(f"the checkpoint is {err}: drop --method and --schedule") from None
    guidance = denoiser.default_guidance
    labels, cfg = sample_labels(args, net.num_classes,
                                DEFAULT_CFG if guidance is None else guidance)
    settings = dict(ckpt=os.path.abspath(args.ckpt), weights=weights_in_use(ckpt, args.weights),
                    labels=labels,
                    cfg=cfg, interval=list(options["interval"]), steps=options["steps"],
                    method=options["method"], batch=args.batch, seed=args.seed,
                    noise_scale=denoiser.noise_scale, t_eps=options["t_eps"], dtype=dtype,
                    schedule=options["schedule"])
    denoiser.check_run(options, cfg)
    images_dir = prepare_out(args.out, settings)
    shape = (net.in_channels, net.input_size, net.input_size)
    paths = [os.path.join(images_dir, f"{i:06d}.png") for i in range(len(labels))]
    done = sum(os.path.exists(p) for p in paths)
    progress = Progress(len(labels), done, unit="img")
    for first in range(0, len(labels), args.batch):
        batch = range(first, min(first + args.batch, len(labels)))
        if all(os.path.exists(paths[i]) for i in batch):
            continue
        y = torch.tensor([labels[i] for i in batch], device=device) if net.num_classes else None
        z0 = initial_noise(batch, shape, args.seed).to(device)
        graphs = device.type == "cuda" and not args.no_graphs
        images = denoiser.sampler_run(y, options, cfg, z0, graphs)
        for i, image in zip(batch, to_uint8(images)):
            save_png(image, paths[i])
        progress.update(first + len(batch))
    progress.close()
    arrays = np.stack([load_png(p) for p in paths])
    save_png(image_grid(arrays[:GRID_IMAGES]), os.path.join(args.out, "grid.png"))
    npz = os.path.join(args.out, "samples.npz")
    label_arrays = {"arr_1": np.array(labels, dtype=np.int64)} if net.num_classes else {}
    atomic_write(npz, lambda f: np.savez(f, arr_0=arrays, **label_arrays))
    print(f"wrote {len(paths)} images to {images_dir}, the grid and {npz} (arr_0: uint8 "
          f"{arrays.shape}, NHWC)")
    if args.fid:
        scores = fid_and_inception_score(images_dir, args.fid_stats, device.type == "cuda",
                                         args.inception_weights)
        atomic_write_json(os.path.join(args.out, "metrics.json"), scores)
        print(" ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return npz


def main(argv=None):
    args = parse_args(argv)
    report_size_limit_as_error()
    try:
        with FolderLock(args.out, command_line("jitfast.sample", argv)):
            write_samples(args)
    except (ValueError, FileNotFoundError, EvaluationError, WriteError, RunFolderError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
