"""The paper's Table 2 in miniature: prediction target (x, e, v) x loss space (x, e, v) for a JiT
whose patch vectors are larger than its hidden size, on the built-in shapes dataset.

Two settings, same network (4 blocks, hidden 64), 16 tokens each:
  bottleneck  32 px, patch 8: 192-d patch vectors through a 16-d bottleneck and a 64-d hidden
              size (as JiT-B/16 squeezes 768-d patches through 128), all 9 cells;
  control     16 px, patch 4: 48-d patch vectors, bottleneck 48, hidden 64 (nothing to squeeze,
              as JiT-B/4 at 64 px in the paper), the 3 prediction targets with the v-loss.
Quality of class-conditional samples, judged by a small CNN trained on the same dataset
(``jitfast.experiments.classifier``): its class accuracy on them, and the Fréchet distance in its
feature space to held-out real images (an FID with that CNN, at this sample size).

    python -m jitfast.experiments.targets [--quick] [--out runs/targets]
"""
import argparse
import json
import os
import time
from types import SimpleNamespace

import torch

from jitfast.diffusion import SPACES, Denoiser
from jitfast.ema import EMA
from jitfast.experiments.classifier import frechet_distance, judge, train_classifier
from jitfast.images import image_grid, save_png, to_uint8
from jitfast.model import JiT
from jitfast.shapes import ShapesDataset
from jitfast.step import set_lr, train_step
from jitfast.train import lr_at

NETWORK = dict(hidden_size=64, depth=4, num_heads=4, in_context_len=4, in_context_start=1,
               num_classes=10, backend="torch")
SETTINGS = {  # name: (image size, patch size, bottleneck dim, cells as (pred, loss))
    "bottleneck": (32, 8, 16, [(p, l) for p in SPACES for l in SPACES]),
    "control": (16, 4, 48, [(p, "v") for p in SPACES]),
}
FULL = dict(steps=800, batch=32, samples_per_class=20, sample_steps=25, classifier_steps=300)
QUICK = dict(steps=60, batch=16, samples_per_class=4, sample_steps=5, classifier_steps=100)


def train_denoiser(size, patch, bottleneck, pred, loss, steps, batch, seed=0, lr=3e-3):
    """A Denoiser trained on fresh shapes images with the trainer's step, warm-up and EMA;
    returns (denoiser, its EMA)."""
    torch.manual_seed(seed)
    net = JiT(input_size=size, patch_size=patch, bottleneck_dim=bottleneck, **NETWORK)
    net.check_values = False
    denoiser = Denoiser(net, pred=pred, loss=loss)
    ema = EMA(denoiser, (0.99,))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    schedule = SimpleNamespace(warmup_steps=min(50, steps // 4), schedule="constant")
    data = ShapesDataset(size, steps * batch, seed)
    for step in range(steps):
        x, y = data.batch(range(step * batch, (step + 1) * batch))
        set_lr(optimizer, lr_at(step, schedule, lr))
        loss_value = train_step(denoiser, denoiser, optimizer, ema, x, y, None, None)
        if not torch.isfinite(loss_value):
            raise RuntimeError(f"{pred}-pred/{loss}-loss: non-finite loss at step {step}")
    return denoiser, ema


def sample(denoiser, ema, labels, steps, seed=0):
    """Class-conditional EMA samples (Heun, no guidance) for labels (B,)."""
    with ema.swapped(1):
        return denoiser.generate(labels, steps=steps,
                                 generator=torch.Generator().manual_seed(seed))


def run_setting(name, config, out, log):
    """Train, sample and judge every cell of one setting; returns {cell: metrics}."""
    size, patch, bottleneck, cells = SETTINGS[name]
    classifier = train_classifier(size, config["classifier_steps"], seed=1)
    count = 10 * config["samples_per_class"]
    held_out, held_labels = ShapesDataset(size, count, seed=2).batch(range(count))
    real_accuracy, real_features = judge(classifier, held_out, held_labels)
    more_real, _ = ShapesDataset(size, count, seed=3).batch(range(count))
    floor = frechet_distance(judge(classifier, more_real, held_labels)[1], real_features)
    results = {"real data": {"accuracy": real_accuracy, "frechet": floor}}
    log(f"{name}: classifier accuracy on held-out real images {real_accuracy:.3f}, "
        f"Fréchet distance real vs real {floor:.2f}")
    labels = torch.arange(10).repeat_interleave(config["samples_per_class"])
    for pred, loss in cells:
        denoiser, ema = train_denoiser(size, patch, bottleneck, pred, loss, config["steps"],
                                       config["batch"])
        images = sample(denoiser, ema, labels, config["sample_steps"])
        accuracy, features = judge(classifier, images, labels)
        cell = f"{pred}-pred/{loss}-loss"
        results[cell] = {"accuracy": accuracy, "frechet": frechet_distance(features, real_features)}
        grid = image_grid(to_uint8(images.clamp(-1, 1)), columns=config["samples_per_class"])
        save_png(grid, os.path.join(out, f"{name}-{pred}-pred-{loss}-loss.png"))
        log(f"{name} {cell}: accuracy {accuracy:.3f}, Fréchet {results[cell]['frechet']:.2f}")
    return results


def markdown_table(results):
    """One table per setting: rows are prediction targets, columns loss spaces, cells
    'accuracy / Fréchet distance'; the real-data reference underneath."""
    lines = []
    for name, cells in results.items():
        size, patch, bottleneck, _ = SETTINGS[name]
        lines += [f"**{name}** ({size} px, patch {patch}: {3 * patch * patch}-d patch vectors, "
                  f"bottleneck {bottleneck}, hidden {NETWORK['hidden_size']}) - class accuracy "
                  f"(higher is better) / Fréchet distance (lower is better)", "",
                  "| prediction | x-loss | e-loss | v-loss |", "| --- | --- | --- | --- |"]
        for pred in SPACES:
            row = [cells.get(f"{pred}-pred/{loss}-loss") for loss in SPACES]
            lines.append(f"| {pred}-pred | " + " | ".join(
                f"{c['accuracy']:.2f} / {c['frechet']:.1f}" if c else "-" for c in row) + " |")
        real = cells["real data"]
        lines += ["", f"Real held-out images: accuracy {real['accuracy']:.2f}, Fréchet distance "
                      f"to other real images {real['frechet']:.1f}.", ""]
    return "\n".join(lines)


def run(config, out, settings=tuple(SETTINGS)):
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:5.0f}s] {message}", flush=True)

    results = {name: run_setting(name, config, out, log) for name in settings}
    table = markdown_table(results)
    seconds = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{table}\n{config}; {seconds} s on {torch.get_num_threads()} thread(s).\n")
    with open(os.path.join(out, "targets.json"), "w") as f:
        json.dump({"config": config, "results": results, "seconds": seconds}, f, indent=1)
    print(table)
    log(f"wrote {out}/table.md, targets.json and the sample grids")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.experiments.targets",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a reduced run (a minute or two): {QUICK}; default {FULL}")
    p.add_argument("--out", default="runs/targets", help="folder for table.md and the grids")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # small matmuls: more threads mostly wait for each other
    run(QUICK if args.quick else FULL, args.out)


if __name__ == "__main__":
    main()
