"""Train a JiT or a pMF model: ``python -m jitfast.train --compile`` (the built-in Fashion-MNIST
subset, a small model, CPU minutes) or ``torchrun --nproc_per_node 8 -m jitfast.train --model
JiT-B/16 --image-size 256 --data-path /data/imagenet/train --batch-size 1024 --steps 500000
--compile``; ``--model pMF-B/16`` trains pixel MeanFlow's one-step model the same way.

The run itself (processes, data, resume, steps, checkpoints, the grid; its determinism) is
``jitfast.training.run``; this command parses its arguments, holds the run folder and reports
errors.
"""
import argparse
import sys
from contextlib import nullcontext

from jitfast.diffusion.sampling import METHODS, SCHEDULES
from jitfast.io.checkpoint import WEIGHT_KEYS, CheckpointError
from jitfast.network.transfer import TransferError
from jitfast.training.data import BUILTIN_DATASETS, DataError
from jitfast.training.errors import TrainingError
from jitfast.training.families import all_presets, family_of
from jitfast.training.recipes import DATASET_DEFAULTS, OFFICIAL, PERCEPTUAL_TERMS, QUICK_START
from jitfast.training.run import run_training, setup_distributed
from jitfast.training.runfolder import (RunFolderError, TrainingFolder, command_line,
                                        latest_checkpoint)
from jitfast.util.files import WriteError, report_size_limit_as_error

# a recipe's value that the user's choice of the other argument replaces (--init-from: the
# parent's noise scale times the resolution factor)
ALTERNATIVES = {"lr": "blr", "ema_halflives": "ema_decays", "noise_scale": "init_from"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jitfast.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", default=None, choices=all_presets(),
        help="preset (JiT's, or pMF's one-step models); default: JiT-T/4 on the built-in "
             "Fashion-MNIST, JiT-N/8 otherwise")
    add("--image-size", type=int, default=None,
        help="training resolution (px); default: 28 on the built-in Fashion-MNIST, 64 otherwise")
    add("--data-path", default=None,
        help="an image folder: one subfolder of images per class (ImageNet layout), or the "
             "images directly in it (an unconditional model); MNIST-format IDX files: a folder "
             "(its train- pair) or one *-images-idx3-ubyte[.gz] file; a folder written by "
             "jitfast.prepare; none: the built-in --dataset")
    add("--dataset", default="fashion-mnist", choices=BUILTIN_DATASETS,
        help="the built-in dataset trained on without --data-path: a subset of Fashion-MNIST "
             "(photos of clothes, 10 classes), or procedurally drawn shapes (10 classes)")
    add("--steps", type=int, default=None,
        help="optimizer steps in the whole run; default: 1600, 800 for pMF-T (its quick start, "
             "compiled in bf16, trains them in 0.88 of the time of JiT's 1600 on the CPU; "
             "docs/quickstart.md)")
    add("--batch-size", type=int, default=32, help="global batch, over all processes")
    add("--blr", type=float, default=None,
        help=f"base lr; lr = blr * batch / 256. Default: {OFFICIAL['blr']:g} (official) for "
             f"JiT-B/L/H/G, {QUICK_START['blr']:g} for the small presets, which train for "
             f"minutes, not epochs")
    add("--lr", type=float, default=None,
        help="absolute lr, overrides --blr. Default for pMF: 1e-3 (its configs, whatever the "
             "batch) for pMF-B/L/H, 1e-2 for the small presets")
    add("--warmup-steps", type=int, default=None,
        help="linear lr warm-up; default: 50 for JiT, none for pMF (its configs)")
    add("--schedule", default=None, choices=("constant", "cosine"),
        help=f"lr after warm-up. Default: {OFFICIAL['schedule']} (official) for JiT-B/L/H/G, "
             f"{QUICK_START['schedule']} for the small presets")
    add("--min-lr", type=float, default=0.0, help="final lr of the cosine schedule")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official: 0)")
    add("--clip-grad", type=float, default=0.0, help="max gradient norm; 0 disables")
    add("--ema-decays", type=float, nargs="+", default=None,
        help="EMA decays, one to three (checkpoints: model_ema1, ...). Default: %g %g "
             "(official) for JiT-B/L/H/G; %g %g for the small presets, whose runs last a few "
             "hundred steps (an EMA averages over about 1/(1-decay) steps)"
             % (*OFFICIAL["ema_decays"], *QUICK_START["ema_decays"]))
    add("--ema-halflives", type=float, nargs="+", default=None,
        help="EDM-style EMAs instead, one to three half-lives in thousands of images, each at "
             "most 5%% of the images seen (pMF's configs: 500 1000 2000, its default for "
             "pMF-B/L/H)")
    add("--optimizer", default=None, choices=("adamw", "apex", "muon"),
        help="torch AdamW (fused on CUDA), apex's FusedAdam, or Muon for the matrices and Adam "
             "for the rest (pMF's recipe: optax.contrib.muon as its official code). Default: "
             "adamw for JiT, muon for pMF")
    add("--label-drop-prob", type=float, default=0.1,
        help="p of the null class (for CFG); 0 for data without classes")
    add("--P-mean", type=float, default=None,
        help=f"logit-normal t: mean. Default: {OFFICIAL['P_mean']} (official, 256-512 px) for "
             f"JiT-B/L/H/G; {QUICK_START['P_mean']} for the small presets at 32-64 px, where "
             f"{OFFICIAL['P_mean']} trains too little near clean images (docs/quickstart.md). "
             f"pMF (its time: t = 1 noise): the preset's config, 1.2 for pMF-T, whose one step "
             f"starts from pure noise")
    add("--P-std", type=float, default=None, help="logit-normal t: std; default: 0.8")
    add("--noise-scale", type=float, default=None,
        help="noise std (official: 2.0 at 512 px). Default: 1.0 for JiT, the preset's config "
             "for pMF; with --init-from the parent's times the resolution factor")
    add("--cfg-beta", type=float, default=None,
        help="pMF: the power of the guidance scales drawn in training (the configs' cfg_beta; "
             "default: the preset's)")
    add("--data-proportion", type=float, default=None,
        help="pMF: the share of each batch trained as flow matching (r = t), the rest as mean "
             "flows over [r, t] (the configs' data_proportion; default: the preset's)")
    add("--perceptual", default=None, metavar="MODULE:FACTORY",
        help="pMF: the perceptual terms of its configs (LPIPS and ConvNeXt features of x-hat "
             "against x), from feature networks you supply: FACTORY() (in a module, or a "
             "FILE.py) returns a callable (x_hat, x) -> (lpips, convnext), each of shape (B,); "
             "jitfast ships none, and without it the terms are off")
    add("--lpips-lambda", type=float, default=None,
        help="with --perceptual: the LPIPS term's weight; default: the preset's config (0.4)")
    add("--convnext-lambda", type=float, default=None,
        help="with --perceptual: the ConvNeXt term's weight; default: the preset's config (0.1)")
    add("--perceptual-max-t", type=float, default=None,
        help="with --perceptual: the terms count for examples with t below this; default: the "
             "preset's config (0.8; 0.6 for L/32 and H/32)")
    add("--seed", type=int, default=0, help="seeds data order, init and every draw")
    add("--out", default="runs/jitfast", help="folder for checkpoints, samples and metrics")
    add("--resume", default=None, help="checkpoint file, or a folder (its latest checkpoint)")
    add("--init-from", default=None,
        help="start a new run from a checkpoint at a lower resolution (any file load_checkpoint "
             "reads): its network transferred to --image-size with --model's patch size "
             "(jitfast.network.transfer), a fresh optimizer, the EMAs from the transferred "
             "weights")
    add("--init-weights", default="ema1", choices=sorted(WEIGHT_KEYS),
        help="which weights of the --init-from checkpoint")
    add("--overwrite", action="store_true",
        help="a new run into an --out that holds a run deletes that run's checkpoints, metrics "
             "and sample grids first (without it, such a folder is refused)")
    add("--log-every", type=int, default=25, help="steps between logs (the only host syncs)")
    add("--ckpt-every", type=int, default=200, help="steps between checkpoints; 0: at the end")
    add("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--cuda-graph", default="auto", choices=("auto", "on", "off"),
        help="replay the whole training step (forward, backward, optimizer, EMA) from one CUDA "
             "graph; auto: on for one CUDA process without --fsdp, --activation-checkpointing, "
             "--compile-mode reduce-overhead or max-autotune, or --optimizer apex")
    add("--compile-mode", default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode; reduce-overhead and max-autotune add CUDA graphs of the "
             "model on GPU (and so turn off --cuda-graph's whole-step graph)")
    add("--backend", default="auto", choices=("auto", "torch", "triton"), help="model ops")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"),
        help="what the step computes in: bf16 runs the forward and backward under bf16 autocast "
             "(float32 weights, optimizer and EMAs) and Muon's Newton-Schulz in bf16; auto: bf16 "
             "on CUDA, fp32 on the CPU. On a CPU with bf16 dot products (avx512_bf16, AMX) bf16 "
             "made the pMF quick start's compiled step 1.6x faster and JiT's 1.2x (a 2-core "
             "Zen 4); elsewhere it is emulated and slower")
    add("--device", default=None, help="default: cuda when available, else cpu")
    add("--cpu-threads", type=int, default=None,
        help="torch threads when training on the CPU; default: all cores. On a busy small "
             "machine, threads that wait for a descheduled peer make steps up to 10x slower: "
             "then give fewer")
    add("--num-workers", type=int, default=None,
        help="DataLoader workers (0: load in the training process); default: one per core, "
             "8 at most")
    add("--max-bad-fraction", type=float, default=0.01,
        help="stop when more than this fraction of the images read so far were unreadable")
    add("--fsdp", action="store_true", help="shard parameters with FSDP2 (fully_shard)")
    add("--activation-checkpointing", action="store_true",
        help="recompute each block in the backward pass (torch.utils.checkpoint)")
    add("--sample-steps", type=int, default=None,
        help="steps of the sample grid. JiT: ODE steps (one evaluation each; Heun: 2·steps - "
             "1), default 15; pMF: evaluations, default 1")
    add("--sample-method", default=None, choices=METHODS,
        help="JiT's sampler of the grid, a preview: the fast setting of docs/samplers.md, "
             "unipc2, by default (the official sampler: --sample-method heun --sample-schedule "
             "linear --sample-steps 50)")
    add("--sample-schedule", default=None, choices=tuple(SCHEDULES),
        help="JiT: time grid of the sample grid's sampler; default: cosine")
    add("--sample-cfg", type=float, default=None,
        help="guidance scale of the sample grid (data without classes: 1, unguided); default: "
             "3 for JiT, the preset's config for pMF (omega)")
    add("--sample-interval", type=float, nargs=2, default=None,
        help="the grid's guidance interval in the family's time (JiT: t = 1 clean, default 0 "
             "1; pMF: t = 1 noise, default the preset's config)")
    add("--samples-per-class", type=int, default=8, help="columns of the sample grid")
    add("--grid-classes", type=int, default=10,
        help="rows of the sample grid: classes, or rows of samples for data without classes")
    args = p.parse_args(argv)
    for name, value in DATASET_DEFAULTS[None if args.data_path else args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    given = [name for name in PERCEPTUAL_TERMS if getattr(args, name) is not None]
    if given and args.perceptual is None:
        p.error(f"--{given[0].replace('_', '-')} sets a perceptual term: give --perceptual too")
    family = family_of(args.model)
    for name, value in family.defaults(args.model).items():  # the preset's recipe
        given_instead = getattr(args, ALTERNATIVES.get(name, ""), None) is not None
        if getattr(args, name) is None and not given_instead:
            setattr(args, name, value)
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        p.error("--steps, --batch-size and --log-every must be positive")
    try:  # the grid is drawn after training: its settings are checked before
        family.check(args)
    except ValueError as err:
        p.error(f"{args.model}: {err}")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run, --resume continues one: give one of them (a run "
                "started with --init-from resumes with --resume alone)")
    if args.noise_scale is None and not args.init_from:
        args.noise_scale = 1.0
    args.parent = None  # the --init-from record, saved with the args
    if args.overwrite and args.resume:
        p.error("--overwrite starts a new run; it does not go with --resume")
    if not 1 <= len(args.ema_halflives or args.ema_decays) <= 3:
        p.error("give one to three EMAs (--ema-decays or --ema-halflives)")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    resume = latest_checkpoint(args.resume) if args.resume else None
    with (TrainingFolder(args.out, command_line("jitfast.train", argv), resume, args.overwrite)
          if rank == 0 else nullcontext()) as folder:
        return run_training(args, rank, world, device, folder)


def cli():
    report_size_limit_as_error()
    try:
        main()
    except (DataError, TrainingError, CheckpointError, TransferError, FileNotFoundError,
            WriteError, RunFolderError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
