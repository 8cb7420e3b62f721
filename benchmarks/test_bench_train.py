"""Training throughput: one optimizer step (forward, backward, AdamW, both EMAs) in images/s and
MFU, for the PyTorch reference eager (the baseline) and compiled, and the Triton kernels eager,
compiled, and compiled with CUDA graphs (CUDA only)."""
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, ON_CUDA, needs_cuda
from jitfast.bench import TRAIN_FACTOR, forward_flops
from jitfast.diffusion import Denoiser
from jitfast.ema import EMA
from jitfast.presets import build
from jitfast.train import make_optimizer, train_step

# (preset, image size, batch)
SIZES = [("JiT-B/16", 256, 128), ("JiT-L/16", 256, 64)] if ON_CUDA else [("JiT-T/8", 64, 16)]
# variant -> (backend, torch.compile mode or None); the first is the baseline
VARIANTS = {"eager": ("torch", None), "compile": ("torch", "default"),
            "triton": ("triton", None), "triton+compile": ("triton", "default"),
            "triton+compile+graphs": ("triton", "reduce-overhead")}
NUM_CLASSES = 1000


def training_step(preset, image, batch, backend, mode):
    """A closure running one training step of a fresh model on a fixed random batch."""
    torch.manual_seed(0)
    net = build(preset, input_size=image, num_classes=NUM_CLASSES, backend=backend)
    net.check_values = False  # as in training: no host syncs
    denoiser = Denoiser(net, label_drop_prob=0.0).to(DEVICE)
    if mode:
        denoiser.compile(mode=None if mode == "default" else mode)
    ema = EMA(denoiser)
    args = SimpleNamespace(optimizer="adamw", weight_decay=0.0)
    optimizer = make_optimizer(args, denoiser.parameters(), 1e-4, DEVICE)
    x = torch.rand(batch, 3, image, image, device=DEVICE) * 2 - 1
    y = torch.randint(NUM_CLASSES, (batch,), device=DEVICE)
    t = denoiser.sample_t(batch, DEVICE)
    noise = torch.randn_like(x)
    return lambda: train_step(denoiser, denoiser, optimizer, ema, x, y, t, noise, 1e-4, 0.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", SIZES, ids=[s[0] for s in SIZES])
def test_train_step(measure, size, variant):
    backend, mode = VARIANTS[variant]
    if backend == "triton" or mode == "reduce-overhead":
        needs_cuda(variant)
    preset, image, batch = size
    measure(training_step(*size, backend, mode), f"train step {preset}", "train", variant,
            baseline=variant == next(iter(VARIANTS)), images=batch,
            flops=TRAIN_FACTOR * forward_flops(preset, image) * batch, preset=preset,
            shape=f"{batch}x{image}px")
