"""The built-in real dataset: a class-balanced subset of Fashion-MNIST (28x28 grayscale photos of
clothes in 10 classes; Zalando Research, MIT licence), kept in the repository xz-compressed
(jitfast/datasets/fashion-mnist/README.md says which images and how the files were made):

    train  the training images of the quick start (from Fashion-MNIST's training split)
    judge  images of its test split, which the quick start's judge trains on and no model does
"""
import io
import lzma
import os
from functools import lru_cache

import numpy as np

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets",
                      "fashion-mnist")
SPLITS = ("train", "judge")


@lru_cache(maxsize=None)
def load_split(split):
    """(images (N, 28, 28) uint8, labels (N,) int64) of a split; read-only arrays, cached."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = os.path.join(FOLDER, f"{split}.npz.xz")
    try:
        with lzma.open(path) as f:
            arrays = np.load(io.BytesIO(f.read()))
            images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    except (OSError, lzma.LZMAError, KeyError, ValueError) as err:
        raise FileNotFoundError(f"the built-in Fashion-MNIST subset {path!r} cannot be read "
                                f"({err}); reinstall jitfast, or train on a folder with "
                                f"--data-path") from None
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
