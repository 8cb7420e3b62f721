"""The workloads that the benchmarks time and ``python -m jitfast.bench profile`` profiles: a
training step and a sampling run of a fresh preset model, in each of their variants, built the
way ``python -m jitfast.train`` and ``Denoiser.generate`` run them; pMF's few-step sampling
run, the way ``PMFSampler.generate`` runs it; the loss and backward of JiT's objective and
of pMF's, side by side; and the step of a ``python -m jitfast.train`` run as it builds it."""
from itertools import count
from types import SimpleNamespace

import torch

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.pmf_objective import PMFObjective
from jitfast.diffusion.pmf_sampler import PMFSampler
from jitfast.network.pmf import PMF
from jitfast.network.pmf_presets import pmf_preset_config
from jitfast.network.presets import build
from jitfast.training.build import build as build_training
from jitfast.training.build import base_lr, build_ema, build_optimizer, build_step
from jitfast.training.families import family_of
from jitfast.training.ema import EMA
from jitfast.training.step import GraphedTrainStep, train_step

NUM_CLASSES = 1000
# the trainer's settings that choose its optimizer: one process, AdamW (on CUDA: AdamWEMA)
ONE_PROCESS = SimpleNamespace(fsdp=False, optimizer="adamw", weight_decay=0.0, precision="auto")
# training variant -> (op backend, torch.compile mode or None, whole step in one CUDA graph);
# the first is the baseline. "+graphs" is torch.compile's own CUDA graphs of the model alone.
TRAIN_VARIANTS = {
    "eager": ("torch", None, False),
    "compile": ("torch", "default", False),
    "triton": ("triton", None, False),
    "triton+compile": ("triton", "default", False),
    "triton+compile+graphs": ("triton", "reduce-overhead", False),
    "triton+graph": ("triton", None, True),
    "triton+compile+graph": ("triton", "default", True),
}
CUDA_ONLY_WORDS = ("triton", "graph")  # variants naming these run on CUDA only
# sampling variant -> replay the whole trajectory from a CUDA graph; the first is the baseline
SAMPLE_VARIANTS = {"eager": False, "graphs": True}
# pMF configurations that are no preset of the official port, for the CPU's benchmarks: "pMF-T/8"
# is JiT-T/8's width, depth, heads and bottleneck (64 px, patch 8) with pMF's blocks, half of
# them the u-head's as in every pMF preset (8 of 16 for B)
PMF_CUSTOM = {"pMF-T/8": dict(patch_size=8, hidden_size=192, depth=6, num_heads=3, head_depth=3,
                              bottleneck_dim=32)}


def cuda_only(variant):
    """Whether a variant runs on CUDA only: its name has the Triton kernels or CUDA graphs."""
    return any(word in variant for word in CUDA_ONLY_WORDS)


def run_step(args, num_classes, device):
    """A closure running one optimizer step of the training run `args` (``python -m
    jitfast.train``'s namespace: its family's objective and per-step draws, its optimizer and
    EMAs, one process) on a fixed batch of images in [-1, 1]; each call is the next step (its
    draws and EMA decays), at the run's base lr, by the command's own step (``build_step``:
    eager, or on CUDA one graph)."""
    torch.manual_seed(args.seed)
    denoiser, model = build_training(args, num_classes, device, world=1)
    ema = build_ema(args, denoiser)
    optimizer = build_optimizer(args, denoiser, ema, base_lr(args), device, world=1)
    draw = family_of(args.model).inputs(denoiser, args, num_classes, device)
    run = build_step(args, model, denoiser, optimizer, ema, device, 1)
    batch, size = args.batch_size, args.image_size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(num_classes, (batch,), device=device)
    steps = count()

    def step():
        index = next(steps)
        ema.at_step(index)
        return run(*draw(index, 0, batch, x, y))
    return step


def random_batch(batch, image, device, seed=0):
    """(x, y, t, noise): images in [-1, 1], labels, logit-normal times and standard noise."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.rand(batch, 3, image, image, device=device, generator=g) * 2 - 1
    y = torch.randint(NUM_CLASSES, (batch,), device=device, generator=g)
    t = torch.sigmoid(torch.randn(batch, device=device, generator=g) * 0.8 - 0.8)
    return x, y, t, torch.randn(x.shape, device=device, generator=g)


def training_step(preset, image, batch, variant, device, cuda=None):
    """A closure running one training step (forward, backward, AdamW, both EMAs) of a fresh
    model on a fixed random batch, with the optimizer one CUDA process of the trainer uses (or,
    cuda=True, uses on CUDA whatever the device: the kernels' compile-ahead). A graphed variant
    is captured here, so that every call of the closure is a replay."""
    backend, mode, graphed = TRAIN_VARIANTS[variant]
    torch.manual_seed(0)
    net = build(preset, input_size=image, num_classes=NUM_CLASSES, backend=backend)
    net.check_values = False  # as in training: no host syncs
    denoiser = Denoiser(net, label_drop_prob=0.0).to(device)
    if mode:
        denoiser.compile(mode=None if mode == "default" else mode)
    ema = EMA(denoiser)
    optimizer = build_optimizer(ONE_PROCESS, denoiser, ema, 1e-4, device, world=1, cuda=cuda)
    inputs = random_batch(batch, image, device)
    if not graphed:
        return lambda: train_step(denoiser, denoiser, optimizer, ema, *inputs)
    step = GraphedTrainStep(denoiser, denoiser, optimizer, ema)
    for _ in range(step.warmup + 1):  # the eager warm-up steps, then the capture
        step(*inputs)
    return lambda: step(*inputs)


def sampler(preset, image, steps, batch, variant, device, cfg, interval, method="heun",
            schedule="linear", dtype=None, backend="auto"):
    """A closure sampling `batch` images of a fresh model with `method` (Heun by default),
    guidance cfg on `interval`; the network in `dtype`, by default bf16 on CUDA (as python -m
    jitfast.sample runs it) and float32 elsewhere."""
    torch.manual_seed(0)
    net = build(preset, input_size=image, num_classes=NUM_CLASSES, backend=backend).to(device)
    net = net.to(dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    denoiser = Denoiser(net)
    y = torch.randint(NUM_CLASSES, (batch,), device=device)
    z0 = torch.randn(batch, 3, image, image, device=device)
    return lambda: denoiser.generate(y, steps, method, cfg, interval, z0,
                                     cuda_graphs=SAMPLE_VARIANTS[variant], schedule=schedule)


def pmf_config(name, image):
    """The PMF keywords of a pMF preset or of a PMF_CUSTOM configuration at `image` px."""
    config = PMF_CUSTOM[name] if name in PMF_CUSTOM else pmf_preset_config(name)
    return {**config, "input_size": image, "num_classes": NUM_CLASSES}


def pmf_sampler(name, image, steps, batch, variant, device, dtype=None, backend="auto",
                **overrides):
    """A closure sampling `batch` images of a fresh PMF (a preset, or PMF_CUSTOM's; `overrides`:
    PMF keywords that replace its own) in `steps` evaluations with the preset's guidance
    settings (the official README's; a custom network: the sampler's defaults), as
    ``PMFSampler.generate`` runs it; the network in `dtype`, by default bf16 on CUDA and float32
    elsewhere. The model is built on `device` (the H/16 weights are initialised there, not on
    the host)."""
    torch.manual_seed(0)
    with device:
        net = PMF(**{**pmf_config(name, image), **overrides}, backend=backend)
    net = net.to(dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    pmf = PMFSampler(net)
    y = torch.randint(NUM_CLASSES, (batch,), device=device)
    z0 = torch.randn(batch, 3, image, image, device=device)
    return lambda: pmf.generate(y, steps, z0=z0, cuda_graphs=SAMPLE_VARIANTS[variant])


def jit_loss_step(preset, image, batch, device, backend="auto"):
    """A closure running JiT's loss and backward (no optimizer) of a fresh preset model on a
    fixed random batch, under bf16 autocast on CUDA: the part of a step that pMF's objective
    replaces, for the ratio of the two."""
    torch.manual_seed(0)
    net = build(preset, input_size=image, num_classes=NUM_CLASSES, backend=backend)
    net.check_values = False
    denoiser = Denoiser(net, label_drop_prob=0.0).to(device)
    inputs = random_batch(batch, image, device)
    return lambda: loss_backward(denoiser, device, lambda: denoiser(*inputs))


def pmf_loss_step(name, image, batch, device, backend="auto", **overrides):
    """A closure running pMF's objective (guidance pass, JVP pass) and its backward on a fresh
    PMF with the v-head (a preset, or PMF_CUSTOM's), with the official defaults and a fixed
    step's draws, under bf16 autocast on CUDA. Returns (closure, objective)."""
    torch.manual_seed(0)
    with device:
        net = PMF(**{**pmf_config(name, image), **overrides}, v_head=True, backend=backend)
    net.check_values = False
    objective = PMFObjective(net)
    images, labels, _, _ = random_batch(batch, image, device)
    draws = objective.draw(batch, seed=0, step=0)
    return (lambda: loss_backward(net, device,
                                  lambda: objective.loss(images, labels, draws)[0])), objective


def loss_backward(model, device, loss):
    """loss() under bf16 autocast on CUDA, its backward, the grads dropped."""
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda",
                        cache_enabled=False):
        value = loss()
    value.backward()
    for p in model.parameters():
        p.grad = None
