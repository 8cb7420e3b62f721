"""The training data path in images/s, batch 128, as the training loop consumes it: the training
loader (the training default of workers, one persistent iterator), the copy to the device,
``to_model_input`` and the step's draws (t, label drops, noise) on the device. Variants: the
built-in shapes (the baseline) and a ``jitfast.prepare`` memmap at 256 px, and an image folder of
256-px PNGs decoded and cropped to 64 px. Separate rows time the loader alone and the draws alone,
so that the reader sees where the time goes."""
import itertools
import os

import pytest
import torch

from conftest import DEVICE, ON_CUDA
from jitfast.diffusion.denoiser import Denoiser
from jitfast.io.images import save_png
from jitfast.network.presets import build
from jitfast.prepare import prepare
from jitfast.training.data import (StepBatches, default_workers, make_loader, open_dataset,
                                   to_model_input)
from jitfast.training.draws import StepDraws
from jitfast.training.shapes import ShapesDataset

SIZE, BATCH, FOLDER_SIZE = 256, 128, 64
IMAGES = 3 * BATCH  # in the memmap and the folder: a few hundred, generated in a few seconds
VARIANTS = ("shapes", "memmap", "folder")  # the first is the baseline
WORKERS = default_workers()
# Batches per timed call: as many as the workers keep in flight (prefetch 4 each), so that the
# warm-up call empties what they rendered ahead while starting, and every timed call waits on them.
PER_CALL = max(4, 4 * WORKERS)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{variant: (data path, image size)}: 256-px shapes images as PNGs in 10 class folders, and
    the memmap that jitfast.prepare writes from them."""
    root = tmp_path_factory.mktemp("data")
    images, labels = ShapesDataset(SIZE, seed=1).batch(range(IMAGES), torch.uint8)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = root / "images" / f"n{label:02d}"
        os.makedirs(folder, exist_ok=True)
        save_png(image.permute(1, 2, 0).numpy(), str(folder / f"{i}.png"))
    prepare(str(root / "images"), str(root / "memmap"), SIZE, workers=os.cpu_count(),
            stream=open(os.devnull, "w"))
    return {"shapes": (None, SIZE), "memmap": (str(root / "memmap"), SIZE),
            "folder": (str(root / "images"), FOLDER_SIZE)}


def batches(source):
    """A persistent iterator over the training loader of a data source, and its image size."""
    path, size = source
    dataset = open_dataset(path, size)
    sampler = StepBatches(len(dataset), BATCH, 0, 0, 10**6)
    return iter(make_loader(dataset, sampler, pin_memory=ON_CUDA)), size


def step_draws(size):
    """The trainer's draws for one process with the whole batch, JiT's default t distribution."""
    denoiser = Denoiser(build("JiT-T/8", input_size=64, num_classes=10))
    return StepDraws(0, BATCH, (3, size, size), denoiser.sample_t, 0.1, DEVICE)


def info(variant, size):
    return dict(preset="–", shape=f"{BATCH}x{size}px", dtype="–", workers=WORKERS,
                dataset=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_path(measure, sources, variant):
    """Loader, copy to the device, model input and draws, as the training loop consumes them
    (into the float image and noise buffers it reuses from step to step)."""
    loader, size = batches(sources[variant])
    draws, steps, null = step_draws(size), itertools.count(), torch.tensor(10, device=DEVICE)
    buffers = [None, None]  # x, noise

    def consume():
        for _ in range(PER_CALL):
            images, labels, _ = next(loader)
            buffers[0] = to_model_input(images.to(DEVICE, non_blocking=True), out=buffers[0])
            _, buffers[1], drop = draws(next(steps), 0, BATCH, buffers[1])
            torch.where(drop, null, labels.to(DEVICE, non_blocking=True))

    measure(consume, "data path", "data", variant, baseline=variant == VARIANTS[0],
            images=BATCH * PER_CALL, **info(variant, size))


@pytest.mark.parametrize("variant", VARIANTS)
def test_loader(measure, sources, variant):
    """The training loader alone: batches of uint8 images in this process's memory."""
    loader, size = batches(sources[variant])

    def consume():
        for _ in range(PER_CALL):
            next(loader)

    measure(consume, "data loader", "data", variant, baseline=variant == VARIANTS[0],
            images=BATCH * PER_CALL, **info(variant, size))


def test_draws(measure):
    """The draws alone at 256 px: BATCH x 3 x 256 x 256 normals (into the trainer's reused
    buffer), t and label drops."""
    draws, steps = step_draws(SIZE), itertools.count()
    noise = torch.empty(BATCH, 3, SIZE, SIZE, device=DEVICE)
    measure(lambda: draws(next(steps), 0, BATCH, noise), "data draws", "data", "draws",
            baseline=True, images=BATCH, **info("–", SIZE))
