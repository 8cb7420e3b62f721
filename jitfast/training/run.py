"""A training run as ``python -m jitfast.train`` runs it, once its arguments are parsed: the
processes (torchrun's), the data, the run's objects (``build``), the resume, the steps with their
logs and checkpoints, and the sample grid at the end.

Determinism: the data order comes from (seed, epoch); a step's draws (JiT's times, noise and label
drops; pMF's times, guidance and drops) are functions of (seed, step, example)
(``jitfast.diffusion.draws``), and the global RNG (dropout) is re-seeded from (seed, step, rank)
every step. So a resumed run repeats an uninterrupted one loss for loss, and N processes with
global batch B reproduce one process with batch B.
"""
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from jitfast.diffusion.draws import seed_of
from jitfast.io.images import save_png
from jitfast.training.build import (base_lr, build, build_ema, build_optimizer, build_step,
                                    computes_bf16)
from jitfast.training.checkpoints import restore, save_run_checkpoint
from jitfast.training.data import (StepBatches, check_unreadable, make_loader, open_dataset,
                                   to_model_input)
from jitfast.training.errors import TrainingError
from jitfast.training.families import family_of
from jitfast.training.grid import sample_grid
from jitfast.training.parent import transferred_run
from jitfast.training.progress import MetricsLog, Progress
from jitfast.training.runfolder import latest_checkpoint
from jitfast.training.schedule import lr_at
from jitfast.training.step import set_lr
from jitfast.util.markers import phase
from jitfast.util.threads import native_bf16, set_cpu_threads

def setup_distributed(device_arg):
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_training(args, rank, world, device, folder):
    """The training run; rank 0 holds `folder` (--out) all along."""
    if device.type == "cpu":
        set_cpu_threads(args.cpu_threads, world)
    if args.batch_size % world:
        raise TrainingError(f"--batch-size {args.batch_size} must be a multiple of the "
                            f"{world} processes")
    torch.manual_seed(args.seed)
    dataset = open_dataset(args.data_path, args.image_size, args.seed, args.dataset)
    if not dataset.num_classes:
        args.label_drop_prob = 0.0  # every label is the null class already
    child = None
    if args.init_from:
        child, args.parent, args.noise_scale, line = transferred_run(
            args.init_from, args.model, args.image_size, dataset.num_classes, args.init_weights,
            args.backend, args.noise_scale)
        if rank == 0:
            print(line, file=sys.stderr)
    denoiser, model = build(args, dataset.num_classes, device, world, child)
    ema = build_ema(args, denoiser)
    lr = base_lr(args)
    try:
        optimizer = build_optimizer(args, denoiser, ema, lr, device, world)
    except ImportError as err:
        raise TrainingError(str(err)) from None
    start = 0
    if args.resume:
        start = restore(latest_checkpoint(args.resume), denoiser, ema, optimizer, args)
    if start >= args.steps:
        raise TrainingError(f"the checkpoint is at step {start}, not before --steps {args.steps}")

    local = args.batch_size // world
    sampler = StepBatches(len(dataset), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = make_loader(dataset, sampler, args.num_workers, pin_memory=device.type == "cuda")
    family = family_of(args.model)
    draw = family.inputs(denoiser, args, dataset.num_classes, device)
    step_fn = build_step(args, model, denoiser, optimizer, ema, device, world)
    os.makedirs(args.out, exist_ok=True)
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"),
                     resumed_from=start if args.resume else None) if rank == 0 else None
    bar = Progress(args.steps, start) if rank == 0 else None
    if rank == 0:
        params = sum(p.numel() for p in denoiser.parameters())
        classes = (f"in {dataset.num_classes} classes" if dataset.num_classes else
                   "without classes (an unconditional model)")
        print(f"{args.model} ({params / 1e6:.1f}M parameters) at {args.image_size} px on "
              f"{world}x {device}, {len(dataset)} images {classes}, global batch "
              f"{args.batch_size}, lr {lr:.3g}, "
              f"{'bf16' if computes_bf16(args, device.type == 'cuda') else 'float32'}, "
              f"steps {start}..{args.steps}",
              file=sys.stderr)
        if getattr(dataset, "origin", None):
            print(f"data: {dataset.origin}", file=sys.stderr)
        if device.type == "cpu" and computes_bf16(args, False) and native_bf16() is False:
            print("note: --precision bf16 on a CPU without bf16 dot products (avx512_bf16, "
                  "AMX) is emulated there, slower than --precision fp32", file=sys.stderr)

    loss_sum = torch.zeros(len(denoiser.metrics), device=device)  # the loss and its extras
    x = None  # a buffer, reused step after step
    seen = bad = 0
    last_ckpt, last_log, timer = None, start, time.perf_counter()
    began = timer
    step = start
    for images, labels, unreadable in loader:
        torch.manual_seed(seed_of(args.seed, step, -1 - rank))  # dropout; examples are >= 0
        with phase("data"):
            x = to_model_input(images.to(device, non_blocking=True), out=x)
            y = labels.to(device, non_blocking=True)
            inputs = draw(step, rank * local, local, x, y)
        set_lr(optimizer, lr_at(step, lr, args.steps, args.warmup_steps, args.schedule,
                                args.min_lr))
        ema.at_step(step)
        loss_sum += step_fn(*inputs)
        step += 1
        seen, bad = seen + len(labels), bad + len(unreadable)
        if unreadable and rank == 0:
            print(f"\nunreadable image(s), replaced: {', '.join(unreadable)}", file=sys.stderr)
        check_unreadable(bad, seen, args.max_bad_fraction, min(len(dataset), 1000) // world)
        save_now = step == args.steps or (args.ckpt_every and step % args.ckpt_every == 0)
        if step % args.log_every == 0 or save_now:  # the host syncs here, and only here
            if world > 1:
                dist.all_reduce(loss_sum)
            means = {name: total / world / (step - last_log)
                     for name, total in zip(denoiser.metrics, loss_sum.tolist())}
            mean_loss = means["loss"]
            if not math.isfinite(mean_loss):
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise TrainingError(f"the loss became non-finite ({mean_loss}) between steps "
                                    f"{last_log} and {step}{where}. Lower --lr/--blr or set "
                                    f"--clip-grad")
            now = time.perf_counter()
            ips = args.batch_size * (step - last_log) / (now - timer)
            if rank == 0:
                log.write(step, **means, lr=float(optimizer.param_groups[0]["lr"]),
                          images_per_s=ips, epoch=step // sampler.steps_per_epoch,
                          elapsed_s=now - began)
                bar.update(step, **means, **{"img/s": ips})
            loss_sum.zero_()
            last_log, timer = step, now
        if save_now:
            last_ckpt = save_run_checkpoint(args, step, sampler.steps_per_epoch, denoiser, ema,
                                            optimizer, rank, folder) or last_ckpt
    if rank == 0:
        bar.close()
        log.close()
    grid = os.path.join(args.out, f"samples-{step:08d}.png")
    if rank == 0 or args.fsdp:  # under FSDP every rank takes part in the forward passes
        image = sample_grid(denoiser, ema, args, dataset.num_classes, device)
    if rank == 0:
        save_png(image, grid)
        print(f"checkpoint: {last_ckpt}\nsamples:    {grid}\nmetrics:    "
              f"{os.path.join(args.out, 'metrics.jsonl')}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return dict(checkpoint=last_ckpt, grid=grid, metrics=os.path.join(args.out, "metrics.jsonl"),
                denoiser=denoiser, ema=ema)


