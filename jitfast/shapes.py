"""The built-in dataset: procedural, class-conditional images of coloured shapes.

Class k is one shape in one colour (a red circle, a blue square, ...) at a random position, size
and rotation, shaded, on a random striped or checkered background. Every image is a pure function
of (seed, index): its parameters come from ``numpy.random.default_rng([seed, index])``, and the
pixels are rendered for a whole batch at once with torch, so generation never limits training.
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


def polygon(rho, theta, sides):
    """Inside a regular polygon of circumradius 1."""
    sector = 2 * math.pi / sides
    local = torch.remainder(theta, sector) - sector / 2
    return rho * torch.cos(local) < math.cos(math.pi / sides)


def star(rho, theta):
    arm = torch.cos(2.5 * torch.remainder(theta, 2 * math.pi / 5) - math.pi / 2).clamp_min(0)
    return rho < 0.45 + 0.55 * arm ** 2


# Inside-tests of each class's shape in local coordinates (u, v; polar rho, theta), unit size.
SHAPES = (
    lambda u, v, rho, theta: rho < 0.9,
    lambda u, v, rho, theta: (u.abs() < 0.75) & (v.abs() < 0.75),
    lambda u, v, rho, theta: polygon(rho, theta + math.pi / 2, 3),
    lambda u, v, rho, theta: star(rho, theta),
    lambda u, v, rho, theta: (rho < 0.95) & (rho > 0.55),
    lambda u, v, rho, theta: (((u.abs() < 0.28) | (v.abs() < 0.28))
                              & (u.abs() < 0.95) & (v.abs() < 0.95)),
    lambda u, v, rho, theta: (rho < 0.95) & (torch.hypot(u - 0.45, v) > 0.75),
    lambda u, v, rho, theta: (u.abs() < 1.0) & (v.abs() < 0.35),
    lambda u, v, rho, theta: (rho < 0.95) & (v > -0.1),
    lambda u, v, rho, theta: torch.hypot(u.abs() - 0.5, v) < 0.42,
)


def shape_mask(labels, u, v):
    """(B, 1, H, W): inside each image's class shape; each class is tested only where present."""
    inside = torch.zeros(u.shape, dtype=torch.bool)
    for k in labels.unique().tolist():
        sel = labels == k
        uk, vk = u[sel], v[sel]
        inside[sel] = SHAPES[k](uk, vk, torch.hypot(uk, vk), torch.atan2(vk, uk))
    return inside.unsqueeze(1)


def render(labels, params, size):
    """Images (B, 3, size, size) in [-1, 1] for labels (B,), uniform params (B, NUM_PARAMS)."""
    p = params.T.unsqueeze(-1).unsqueeze(-1)  # each (B, 1, 1)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    # Background: stripes (p5 < 0.5) or a checkerboard of two muted colours.
    angle, freq, phase = p[0] * math.pi, 2 + 6 * p[1], 2 * math.pi * p[2]
    along = gx * torch.cos(angle) + gy * torch.sin(angle)
    across = -gx * torch.sin(angle) + gy * torch.cos(angle)
    stripes = torch.sin(freq * math.pi * along + phase)
    checks = stripes * torch.sin(freq * math.pi * across + phase)
    pattern = (torch.where(p[5] < 0.5, stripes, checks) > 0).float().unsqueeze(1)
    base = 0.25 + 0.4 * params[:, 6:9, None, None]
    alt = base * (0.6 + 0.3 * p[3].unsqueeze(1))
    background = alt + (base - alt) * pattern
    # Foreground: the class's shape, rotated, scaled and shifted, with a light gradient.
    radius = 0.3 + 0.3 * p[9]
    cx, cy = (1 - radius) * (2 * p[10] - 1), (1 - radius) * (2 * p[11] - 1)
    rot = 2 * math.pi * p[12]
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    u = dx * torch.cos(rot) + dy * torch.sin(rot)
    v = -dx * torch.sin(rot) + dy * torch.cos(rot)
    inside = shape_mask(labels, u, v)
    colour = torch.tensor([c for _, c in CLASSES])[labels][:, :, None, None]
    shade = 0.85 + 0.15 * (u * torch.cos(2 * math.pi * p[13]) - v * torch.sin(2 * math.pi * p[13]))
    jitter = (0.9 + 0.1 * p[14]).unsqueeze(1)
    foreground = (colour * jitter * shade.unsqueeze(1)).clamp(0, 1)
    image = torch.where(inside, foreground, background)
    return image * 2 - 1


class ShapesDataset(torch.utils.data.Dataset):
    """`length` procedural images of `size` px; item i is (image (3, size, size) in [-1, 1], label).

    Labels cycle through the classes (index % 10), so every epoch is balanced. ``__getitems__``
    renders a batch in one vectorised pass; items are (index, flip) pairs as the samplers of
    ``jitfast.data`` yield them (the flip is ignored: the shapes are already random).
    """

    def __init__(self, size=64, length=100_000, seed=0):
        self.size, self.length, self.seed = size, length, seed
        self.num_classes = NUM_CLASSES
        self.class_names = [name for name, _ in CLASSES]

    def __len__(self):
        return self.length

    def params(self, index):
        return np.random.default_rng([self.seed, index]).random(NUM_PARAMS, dtype=np.float32)

    def batch(self, indices):
        """(images (B, 3, size, size), labels (B,)) for a sequence of indices."""
        labels = torch.tensor([i % NUM_CLASSES for i in indices], dtype=torch.long)
        params = torch.from_numpy(np.stack([self.params(i) for i in indices]))
        return render(labels, params, self.size), labels

    def __getitem__(self, index):
        index = index[0] if isinstance(index, tuple) else index
        images, labels = self.batch([index])
        return images[0], labels[0]

    def __getitems__(self, items):
        """A training batch (images, labels, unreadable paths: none here)."""
        return (*self.batch([index for index, _ in items]), [])
