"""Data loading in images/s: the built-in shapes dataset (the baseline), an image folder of PNGs,
and the memory-mapped array that ``jitfast.prepare`` writes from it, through the training loader
(batches of uint8 or float images, converted to the model's input)."""
import os

import numpy as np
import pytest

from jitfast.data import StepBatches, make_loader, open_dataset, to_model_input
from jitfast.images import save_png
from jitfast.prepare import prepare

IMAGE, CLASSES, PER_CLASS, BATCH, BATCHES = 64, 4, 16, 32, 8
VARIANTS = ("shapes", "folder", "memmap")  # the first is the baseline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: data path} for a tiny generated ImageNet-layout folder and its memmap copy."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        os.makedirs(root / "images" / f"n{c:08d}")
        for i in range(PER_CLASS):
            image = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
            save_png(image, str(root / "images" / f"n{c:08d}" / f"{i}.png"))
    prepare(str(root / "images"), str(root / "memmap"), IMAGE, workers=1,
            stream=open(os.devnull, "w"))
    return {"shapes": None, "folder": str(root / "images"), "memmap": str(root / "memmap")}


def epoch(dataset):
    """Read BATCHES batches through the training loader (in this process)."""
    sampler = StepBatches(len(dataset), BATCH, 0, 0, BATCHES)
    for images, _, _ in make_loader(dataset, sampler, num_workers=0, pin_memory=False):
        to_model_input(images)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loader(measure, folders, variant):
    dataset = open_dataset(folders[variant], IMAGE)
    measure(lambda: epoch(dataset), "data loader", "data", variant,
            baseline=variant == VARIANTS[0], images=BATCH * BATCHES, preset="–",
            shape=f"{BATCH}x{IMAGE}px", dtype="–")
