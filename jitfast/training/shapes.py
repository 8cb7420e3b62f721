"""The built-in dataset: procedural, class-conditional images of coloured shapes.

Class k is one shape in one colour (a red circle, a blue square, ...) at a random position, size
and rotation, shaded, on a random striped or checkered background. Every image is a pure function
of (seed, index): its parameters come from ``numpy.random.default_rng([seed, index])``.

Rendering is cheap enough to run in DataLoader workers beside training (about 0.25 ms of one
core per 256-px image): images are drawn one at a time, so that their temporaries stay in the
cache; every quantity affine in the pixel coordinates (the shape's local frame, its shading, the
background waves) is an outer sum of a row and a column vector; and the shape is drawn only in
the box of pixels that can hold it.
"""
import math

import numpy as np
import torch

# (name, RGB in [0, 1]): ten shapes whose colours differ as much as their outlines.
CLASSES = (
    ("circle", (0.95, 0.15, 0.15)), ("square", (0.15, 0.30, 0.95)),
    ("triangle", (0.10, 0.80, 0.20)), ("star", (1.00, 0.90, 0.10)),
    ("ring", (0.90, 0.20, 0.85)), ("cross", (0.10, 0.90, 0.90)),
    ("crescent", (1.00, 1.00, 1.00)), ("bar", (1.00, 0.55, 0.05)),
    ("semicircle", (0.55, 0.20, 0.90)), ("dots", (0.05, 0.05, 0.05)),
)
NUM_CLASSES = len(CLASSES)
NUM_PARAMS = 16  # uniform draws per image, see ``render``
EXTENT = 1.1  # every unit shape lies within this distance of its centre


def polygon(u, v, sides):
    """Inside a regular polygon of circumradius 1."""
    sector = 2 * math.pi / sides
    local = torch.remainder(torch.atan2(v, u), sector) - sector / 2
    return torch.hypot(u, v) * torch.cos(local) < math.cos(math.pi / sides)


def star(u, v):
    theta = torch.atan2(v, u)
    arm = torch.cos(2.5 * torch.remainder(theta, 2 * math.pi / 5) - math.pi / 2).clamp_min(0)
    return torch.hypot(u, v) < 0.45 + 0.55 * arm ** 2


def disc(u, v, radius):
    return u * u + v * v < radius * radius


# Inside-tests of each class's shape in local coordinates (u, v), unit size.
SHAPES = (
    lambda u, v: disc(u, v, 0.9),
    lambda u, v: torch.maximum(u.abs(), v.abs()) < 0.75,
    lambda u, v: polygon(-v, u, 3),  # turned a quarter: pointing up
    star,
    lambda u, v: disc(u, v, 0.95) & ~disc(u, v, 0.55),
    lambda u, v: (((u.abs() < 0.28) | (v.abs() < 0.28))
                  & (torch.maximum(u.abs(), v.abs()) < 0.95)),
    lambda u, v: disc(u, v, 0.95) & ~disc(u - 0.45, v, 0.75),
    lambda u, v: (u.abs() < 1.0) & (v.abs() < 0.35),
    lambda u, v: disc(u, v, 0.95) & (v > -0.1),
    lambda u, v: disc(u.abs() - 0.5, v, 0.42),
)


def wave(a, b):
    """sin(a + b) for a row a (W,) and a column b (H,), numpy vectors: an (H, W) tensor."""
    sin_a, cos_a, sin_b, cos_b = (torch.from_numpy(f(z)) for z in (a, b) for f in (np.sin, np.cos))
    return torch.outer(cos_b, sin_a).addcmul_(sin_b[:, None], cos_a)


def blend(mask, a, b):
    """a where mask is set, else b, exactly (both terms are finite); for the CPU, where
    torch.where takes ~3.6 ns per element (this: ~0.15)."""
    m = mask.to(a.dtype)
    return a * m + b * (1 - m)


FINISH = {  # [0, 1] -> the output dtype, as jitfast.io.images.to_uint8 quantises [-1, 1]
    torch.float32: lambda x: x * 2 - 1,
    torch.uint8: lambda x: (x * 255).round_().to(torch.uint8),
}


def render_image(label, params, axis, finish):
    """One image (3, S, S) for a label and uniform params (NUM_PARAMS,) on the pixel centres
    `axis` (S,); `finish` maps [0, 1] to the output values (see FINISH). The 1-D quantities are
    numpy vectors (a torch op on a few hundred numbers costs more in overhead than in work)."""
    p = params.tolist()
    # Background: stripes sin(f·π·along + phase) (p5 < 0.5), or their product with the stripes
    # across them (a checkerboard), thresholded at 0; two muted colours.
    angle, freq, phase = p[0] * math.pi, (2 + 6 * p[1]) * math.pi, 2 * math.pi * p[2]
    cos_a, sin_a = freq * math.cos(angle), freq * math.sin(angle)
    pattern = wave(cos_a * axis + phase, sin_a * axis)
    if p[5] >= 0.5:
        pattern *= wave(phase - sin_a * axis, cos_a * axis)
    base = 0.25 + 0.4 * params[6:9]
    alt = base * (0.6 + 0.3 * params[3])
    image = blend(pattern > 0, finish(base)[:, None, None], finish(alt)[:, None, None])
    # Foreground: the class's shape, rotated, scaled and shifted, with a light linear gradient,
    # drawn in the box of pixels within EXTENT radii of its centre.
    radius = 0.3 + 0.3 * p[9]
    cx, cy = (1 - radius) * (2 * p[10] - 1), (1 - radius) * (2 * p[11] - 1)
    cols, rows = (box(c, EXTENT * radius, len(axis)) for c in (cx, cy))
    dx, dy = (axis[cols] - cx) / radius, (axis[rows] - cy) / radius
    rot, tilt = 2 * math.pi * p[12], 2 * math.pi * p[13]
    ux, uy = dx * math.cos(rot), dy * math.sin(rot)  # u = ux + uy, v = vx + vy
    vx, vy = dx * -math.sin(rot), dy * math.cos(rot)
    shade_x = 0.85 + 0.15 * (ux * math.cos(tilt) - vx * math.sin(tilt))
    shade_y = 0.15 * (uy * math.cos(tilt) - vy * math.sin(tilt))
    ux, uy, vx, vy, shade_x, shade_y = map(torch.from_numpy, (ux, uy, vx, vy, shade_x, shade_y))
    inside = SHAPES[label](ux + uy[:, None], vx + vy[:, None])
    tint = torch.tensor(CLASSES[label][1]) * (0.9 + 0.1 * params[14])
    shade = tint[:, None, None] * shade_x + (tint[:, None] * shade_y)[:, :, None]
    region = image[:, rows, cols]
    region.copy_(blend(inside, finish(shade.clamp_(0, 1)), region))
    return image


def box(centre, extent, size):
    """The pixels (a slice of 0..size) whose centres lie within `extent` of `centre` in the
    [-1, 1] image coordinates, and maybe one more at each end."""
    return slice(max(0, math.floor((centre - extent + 1) * size / 2)),
                 min(size, math.ceil((centre + extent + 1) * size / 2)))


def render(labels, params, size, dtype=torch.float32):
    """Images (B, 3, size, size) for labels (B,) and uniform params (B, NUM_PARAMS): float32 in
    [-1, 1], or uint8 rounded as ``jitfast.io.images.to_uint8`` rounds them (round(255·(x+1)/2))."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    images = torch.empty((len(labels), 3, size, size), dtype=dtype)
    for i, label in enumerate(labels.tolist()):
        images[i] = render_image(label, params[i], axis, FINISH[dtype])
    return images


class ShapesDataset(torch.utils.data.Dataset):
    """`length` procedural images of `size` px. Item i is (uint8 image (3, size, size), label),
    as every training dataset gives them; ``batch`` renders float images in [-1, 1] for
    in-process use (the experiments).

    Labels cycle through the classes (index % 10), so every epoch is balanced. ``__getitems__``
    renders a training batch; items are (index, flip) pairs as the samplers of
    ``jitfast.training.data`` yield them (the flip is ignored: the shapes are already random).
    """

    def __init__(self, size=64, length=100_000, seed=0):
        self.size, self.length, self.seed = size, length, seed
        self.num_classes = NUM_CLASSES
        self.class_names = [name for name, _ in CLASSES]

    def __len__(self):
        return self.length

    def params(self, index):
        return np.random.default_rng([self.seed, index]).random(NUM_PARAMS, dtype=np.float32)

    def batch(self, indices, dtype=torch.float32):
        """(images (B, 3, size, size), labels (B,)) for a sequence of indices: float32 in
        [-1, 1] or uint8 (see ``render``)."""
        labels = torch.tensor([i % NUM_CLASSES for i in indices], dtype=torch.long)
        params = torch.from_numpy(np.stack([self.params(i) for i in indices]))
        return render(labels, params, self.size, dtype), labels

    def __getitem__(self, index):
        index = index[0] if isinstance(index, tuple) else index
        images, labels = self.batch([index], torch.uint8)
        return images[0], labels[0]

    def __getitems__(self, items):
        """A training batch (uint8 images, labels, unreadable paths: none here)."""
        return (*self.batch([index for index, _ in items], torch.uint8), [])
