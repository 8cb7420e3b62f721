"""Model images to files: uint8 conversion (as the official evaluation does), grids, PNGs."""
import math

import numpy as np
import torch
from PIL import Image

from jitfast.util.files import atomic_write


def to_uint8(images):
    """(B, C, H, W) float images in [-1, 1] -> (B, H, W, C) uint8 numpy:
    round(clip(255·(x+1)/2))."""
    x = (images.detach().float().cpu() + 1) / 2
    return (x.permute(0, 2, 3, 1) * 255).clamp(0, 255).round().to(torch.uint8).numpy()


def image_grid(images, columns=None):
    """(B, H, W, C) uint8 -> one (rows·H, columns·W, C) image, row-major, black where empty."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * columns, height, width, channels), dtype=np.uint8)
    grid[:count] = images
    grid = grid.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * height, columns * width, channels)


def save_png(image, path):
    """Write an (H, W, C) uint8 image as PNG atomically: no half-written file is ever seen."""
    image = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)


def load_png(path):
    """An (H, W, C) uint8 array from a PNG written by ``save_png``."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array
