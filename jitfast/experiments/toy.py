"""The paper's toy experiment (Figure 2): 2-D data on a manifold embedded in D dimensions.

A spiral in 2-D is mapped into D dimensions by a random column-orthogonal matrix P (D x 2). A
5-layer ReLU MLP, 256 wide, is trained with the v-loss for each prediction target (x, e, v) and
sampled with the same ODE sampler as JiT. Three metrics per model, on its samples:
  near_spiral   the fraction whose projection Pᵀx lies within 0.1 of a held-out data point
                (precision: on the spiral, not in the gaps between its arms);
  sw_2d         the sliced Wasserstein distance of the projections to held-out data (coverage;
                a blob round the spiral scores well on it);
  off_manifold  the mean residual ‖x - P Pᵀ x‖ (data: 0; untouched noise: about √(D-2)), which
                the projection hides: a net too narrow to carry D-dim noise (D > 256) can
                still get the 2-D part right.
Times are drawn from the logit-normal with P_mean = +0.8 (JiT's images use -0.8): a thin curve
in 2-D is resolved near t = 1, which -0.8 seldom trains; with -0.8 no target learns the spiral
in 1000 steps (docs/experiments.md).

    python -m jitfast.experiments.toy [--out runs/toy] [--dims 2 8 16 512] [--steps 1000] \
        [--seeds 0 1 2]
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from jitfast.diffusion.denoiser import SPACES, Denoiser
from jitfast.experiments import mean_std
from jitfast.io.images import save_png


def spiral(n, generator):
    """Points on a two-turn spiral with a little jitter, scaled to about unit variance."""
    u = torch.rand(n, generator=generator)
    angle = 4 * math.pi * u
    radius = 0.3 + 1.7 * u
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return points + 0.03 * torch.randn(n, 2, generator=generator)


def column_orthogonal(dim, generator):
    """A random (dim, 2) matrix with orthonormal columns (an orthogonal matrix when dim = 2)."""
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
    return q


class ToyMLP(nn.Module):
    """5-layer ReLU MLP on (z, t) -> D outputs, shaped as the 1x1 'images' a Denoiser expects."""

    def __init__(self, dim, width=256, depth=5):
        super().__init__()
        self.in_channels, self.input_size, self.num_classes = dim, 1, 1
        layers, fan_in = [], dim + 1
        for _ in range(depth - 1):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.mlp = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, z, t, y):
        out = self.mlp(torch.cat([z.flatten(1), t[:, None].to(z.dtype)], dim=1))
        return out.view_as(z)


def sliced_wasserstein(a, b, projections=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-1 distance of equal-size point sets."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(2, projections, generator=g)
    directions = directions / directions.norm(dim=0)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def near_fraction(points, reference, radius=0.1):
    """The fraction of 2-D points within `radius` of some reference point."""
    return (torch.cdist(points, reference).min(dim=1).values < radius).float().mean().item()


def off_manifold(points, basis):
    """Mean distance of D-dim points from the plane spanned by the columns of `basis`."""
    return (points - points @ basis @ basis.T).norm(dim=1).mean().item()


def train_and_sample(dim, pred, steps, batch=256, samples=2000, seed=0, P_mean=0.8):
    """Train one MLP on the embedded spiral; returns (its D-dim samples, the basis P)."""
    g = torch.Generator().manual_seed(seed)
    basis = column_orthogonal(dim, g)
    torch.manual_seed(seed)
    denoiser = Denoiser(ToyMLP(dim), pred=pred, loss="v", label_drop_prob=0.0, P_mean=P_mean)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    for _ in range(steps):
        x = (spiral(batch, g) @ basis.T).view(batch, dim, 1, 1)
        loss = denoiser.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    z0 = torch.randn(samples, dim, 1, 1, generator=g)
    out = denoiser.generate(torch.zeros(samples, dtype=torch.long), steps=50, z0=z0)
    return out.flatten(1), basis


def scatter_panel(points, title, size=200, extent=2.5):
    """A white square with the points drawn in black and the title on top."""
    image = Image.new("RGB", (size, size + 16), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), title, fill="black")
    pixels = ((points.clamp(-extent, extent) + extent) / (2 * extent) * (size - 1)).round()
    for px, py in pixels.tolist():
        draw.point((px, 16 + size - 1 - py), fill="black")
    return np.asarray(image)


METRICS = ("near_spiral", "sw_2d", "off_manifold")


def markdown_table(results, dims):
    """Rows D, columns the targets, cells 'near / SW / off' as mean ± std over the seeds."""
    lines = ["| D | " + " | ".join(f"{p}-pred near / SW / off" for p in SPACES) + " |",
             "| --- |" + " --- |" * len(SPACES)]
    for dim in dims:
        cells = [" / ".join(f"{m['mean']:.3g} ± {m['std']:.2g}" for m in (
            results[f"D={dim}/{pred}-pred"][k] for k in METRICS)) for pred in SPACES]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(dims, steps, out, seeds=(0,), P_mean=0.8):
    """Every (D, target) for each seed (data, basis, init and noise); the figure of the first
    seed; metrics as mean ± std over the seeds."""
    os.makedirs(out, exist_ok=True)
    per_seed, rows = {}, []
    start = time.perf_counter()
    for seed in seeds:
        reference = spiral(2000, torch.Generator().manual_seed(seed + 1))
        for dim in dims:
            row = [scatter_panel(reference, f"data (D={dim})")]
            for pred in SPACES:
                samples, basis = train_and_sample(dim, pred, steps, seed=seed, P_mean=P_mean)
                points = samples @ basis
                metrics = dict(zip(METRICS, (near_fraction(points, reference),
                                             sliced_wasserstein(points, reference),
                                             off_manifold(samples, basis))))
                for key, value in metrics.items():
                    per_seed.setdefault(f"D={dim}/{pred}-pred", {}).setdefault(key, []).append(
                        round(value, 4))
                row.append(scatter_panel(points, f"{pred}: near {metrics['near_spiral']:.2f} "
                                                 f"off {metrics['off_manifold']:.3g}"))
                print(f"seed {seed} D={dim:4d} {pred}-pred: near the spiral "
                      f"{metrics['near_spiral']:.3f}, sliced Wasserstein (2-D) "
                      f"{metrics['sw_2d']:.4f}, off-manifold residual "
                      f"{metrics['off_manifold']:.4f} ({time.perf_counter() - start:.0f}s)",
                      flush=True)
            if seed == seeds[0]:
                rows.append(np.concatenate(row, axis=1))
    save_png(np.concatenate(rows, axis=0), os.path.join(out, "toy.png"))
    results = {cell: {k: mean_std(v) for k, v in by_metric.items()}
               for cell, by_metric in per_seed.items()}
    table = markdown_table(results, dims)
    report = {"metrics": {"near_spiral": "fraction of projected samples within 0.1 of "
                                         "held-out data (higher is better)",
                          "sw_2d": "sliced Wasserstein-1 of the samples projected to 2-D, to "
                                   "held-out data (lower is better)",
                          "off_manifold": "mean ||x - P P^T x|| of the samples (data: 0; "
                                          "pure noise: about sqrt(D-2))"},
              "steps": steps, "P_mean": P_mean, "dims": list(dims), "seeds": list(seeds),
              "results": results, "per_seed": per_seed,
              "seconds": round(time.perf_counter() - start, 1)}
    with open(os.path.join(out, "toy.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {out}/toy.png, toy.json and table.md")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.experiments.toy",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 16, 512],
                   help="ambient dimensions D")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model")
    p.add_argument("--P-mean", type=float, default=0.8,
                   help="logit-normal t: mean (JiT's images: -0.8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run per seed; mean ± std over them (the figure: the first)")
    p.add_argument("--out", default="runs/toy", help="folder for toy.png and toy.json")
    args = p.parse_args(argv)
    if min(args.dims) < 2 or args.steps < 1:
        p.error("--dims must be >= 2 and --steps >= 1")
    torch.set_num_threads(1)  # tiny matmuls: more threads mostly wait for each other
    run(args.dims, args.steps, args.out, args.seeds, args.P_mean)


if __name__ == "__main__":
    main()
