"""The official JiT code (LTH14/JiT as first published) timed in the same run as jitfast, so that
each speed-up over it is a ratio of two medians of one run on one machine (the report's "vs
official" column): its training step as engine_jit.py's train_one_epoch runs it, and its Heun
sampler as engine_jit.py's evaluate runs it, each in the group of the jitfast rows it compares
with (variant "official", never the group's baseline). Weights are random: speed only.

The code is imported from .official/ (git-ignored; benchmarks/official_code.sh writes it), never
from our tree, and is not edited: on the CPU, where it pins tensors to CUDA, ``Tensor.cuda`` is
the identity while these tests run, and its bf16 autocast is off (float32, as jitfast there).
"""
import argparse
import copy
import importlib
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_CUDA, REPEATS
from jitfast.measure.throughput import TRAIN_FACTOR, forward_flops
from jitfast.measure.workloads import NUM_CLASSES, random_batch
from jitfast.network.presets import preset_config
from test_bench_sampling import CFG, INTERVAL, MATCHED_BATCHES, SIZE, network_passes, shape
from test_bench_train import SIZES

OFFICIAL = Path(__file__).resolve().parent.parent / ".official"
TRAIN_SIZE = SIZES[0]  # (preset, image, batch): JiT-B/16 256 px batch 128 on CUDA


def official_args(preset, image, **overrides):
    """Denoiser's arguments: main_jit.py's defaults (main_jit.py itself needs tensorboard, cv2
    and torch_fidelity, so they are restated here)."""
    return argparse.Namespace(**{
        "model": preset, "img_size": image, "class_num": NUM_CLASSES, "attn_dropout": 0.0,
        "proj_dropout": 0.0, "label_drop_prob": 0.1, "P_mean": -0.8, "P_std": 0.8,
        "t_eps": 0.05, "noise_scale": 1.0, "ema_decay1": 0.9999, "ema_decay2": 0.9996,
        "sampling_method": "heun", "num_sampling_steps": 50, "cfg": 1.0, "interval_min": 0.0,
        "interval_max": 1.0, **overrides})


def autocast():
    """engine_jit.py's autocast around both training and sampling; off on the CPU."""
    return torch.amp.autocast("cuda", dtype=torch.bfloat16, enabled=ON_CUDA)


@pytest.fixture
def official(monkeypatch):
    """The official Denoiser class, with main_jit.py's process settings for the test's length:
    cudnn.benchmark, and a dynamo cache of 128 (its blocks are each under @torch.compile).
    A preset the official code lacks (the CPU's JiT-T/8) is its JiT class with our preset's
    architecture."""
    if not (OFFICIAL / "model_jit.py").exists():
        pytest.skip(f"no official code in {OFFICIAL}: run benchmarks/official_code.sh first")
    pytest.importorskip("einops", reason="the official code needs einops (pip install einops)")
    monkeypatch.syspath_prepend(str(OFFICIAL))
    model_jit = importlib.import_module("model_jit")
    assert Path(model_jit.__file__).parent == OFFICIAL, f"model_jit from {model_jit.__file__}"
    for preset in (TRAIN_SIZE[0], SIZE[0]):
        if preset not in model_jit.JiT_models:
            monkeypatch.setitem(model_jit.JiT_models, preset,
                                partial(model_jit.JiT, **preset_config(preset)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    if not ON_CUDA:  # also while torch.compile traces its blocks (functionalized tensors)
        from torch._subclasses.functional_tensor import FunctionalTensor
        for cls in (torch.Tensor, FunctionalTensor):
            monkeypatch.setattr(cls, "cuda", lambda self, *args, **kwargs: self)
    with torch._dynamo.config.patch(cache_size_limit=128):  # not monkeypatch: it loses the name
        yield importlib.import_module("denoiser").Denoiser


def commit():
    return (OFFICIAL / "COMMIT").read_text().strip() if (OFFICIAL / "COMMIT").exists() else None


def param_groups(model):
    """util/misc.py's add_weight_decay at main_jit.py's default weight decay 0: biases and 1-D
    parameters in the first group, the rest in the second."""
    no_decay = [p for n, p in model.named_parameters()
                if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.0}]


@pytest.mark.parametrize("size", [TRAIN_SIZE], ids=[f"{TRAIN_SIZE[0]}-b{TRAIN_SIZE[2]}"])
def test_official_train_step(measure, official, size):
    """One iteration of train_one_epoch after its data loading, on a fixed batch in [-1, 1]:
    forward under bf16 autocast, loss.item() (its finiteness check), zero_grad, backward,
    main_jit.py's AdamW (betas 0.9/0.95, lr 5e-5 × batch / 256, not fused), a device sync and
    update_ema. Left out: DistributedDataParallel (main_jit.py wraps even one process in it, and
    its all-reduce would only add time) and the per-step learning-rate assignment (a constant)."""
    preset, image, batch = size
    torch.manual_seed(0)
    model = official(official_args(preset, image)).to(DEVICE)
    model.train(True)
    model.ema_params1 = copy.deepcopy(list(model.parameters()))  # as main_jit.py starts them
    model.ema_params2 = copy.deepcopy(list(model.parameters()))
    optimizer = torch.optim.AdamW(param_groups(model), lr=5e-5 * batch / 256, betas=(0.9, 0.95))
    x, labels = random_batch(batch, image, DEVICE)[:2]

    def step():
        with autocast():
            loss = model(x, labels)
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ON_CUDA:
            torch.cuda.synchronize()
        model.update_ema()
    measure(step, f"train step {preset} batch {batch}", "train", "official", baseline=False,
            images=batch, flops=TRAIN_FACTOR * forward_flops(preset, image) * batch,
            preset=preset, shape=f"{batch}x{image}px", official=commit())


@pytest.mark.parametrize("batch", MATCHED_BATCHES)
def test_official_sampling(measure, official, monkeypatch, batch):
    """Denoiser.generate (Heun, the last step Euler, both guidance halves at every evaluation)
    under no_grad and bf16 autocast over float32 weights, as evaluate runs it; FLOPs counted as
    for jitfast's rows (the passes the trajectory needs, the same per image). A 2-step run
    compiles its blocks first, so that no timed round pays for that; on CUDA it is timed in 3
    rounds at batch 1 and 1 round at larger batches (Heun-50 at batch 128 took about 20 s a
    call on an H100)."""
    preset, image, steps, _ = SIZE
    torch.manual_seed(0)
    model = official(official_args(preset, image, num_sampling_steps=2, cfg=CFG,
                                   interval_min=INTERVAL[0], interval_max=INTERVAL[1]))
    model = model.to(DEVICE).eval()
    labels = torch.randint(NUM_CLASSES, (batch,), device=DEVICE)

    def sample():
        with torch.no_grad(), autocast():
            model.generate(labels)
    sample()
    model.steps = steps
    if ON_CUDA:
        monkeypatch.setitem(REPEATS, "sample", (3, 1, 0) if batch == 1 else (1, 1, 0))
    measure(sample, f"sample {preset} batch {batch}", "sample", "official", baseline=False,
            images=batch,
            flops=forward_flops(preset, image) * batch * network_passes("heun", steps),
            preset=preset, shape=shape(batch, image, f"{steps} Heun steps"), official=commit())
