"""The sample grid a training run draws at its end, by its family's sampler."""
import torch

from jitfast.io.images import image_grid, to_uint8
from jitfast.training.families import family_of


def sample_grid(denoiser, ema, args, num_classes, device):
    """A uint8 (H, W, 3) grid of EMA-1 samples by the family's sampler, one row per class (evenly
    spaced classes); for an unconditional model (no classes), --grid-classes rows of unguided
    samples."""
    y, count = None, args.grid_classes * args.samples_per_class
    if num_classes:
        classes = torch.linspace(0, num_classes - 1, min(args.grid_classes, num_classes)).round()
        y = classes.long().repeat_interleave(args.samples_per_class).to(device)
        count = None
    images = family_of(args.model).grid(denoiser, ema, args, y, count, device)
    return image_grid(to_uint8(images), columns=args.samples_per_class)
