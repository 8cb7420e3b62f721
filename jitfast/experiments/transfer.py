"""Resolution transfer at CPU scale (docs/design.md §8): does a JiT trained at 32 px, transferred to
64 px by ``jitfast.network.transfer`` (same 8x8 token grid, patch 4 -> 8, noise scale 1 -> 2), beat
training at 64 px from scratch?

Per seed: a parent at 32 px, patch 4, trained P steps; four children at 64 px, patch 8, noise
scale 2, all with the same later data and the same sampling noise:
  transferred          the parent's EMA transferred, no fine-tuning
  transferred + N      the same, fine-tuned N steps (fresh optimizer and EMA)
  scratch N            a fresh JiT trained N steps
  scratch P + N        a fresh JiT trained as many steps as parent and fine-tuning together
Judged at 64 px by the CNN judge and its colour-blind twin (``jitfast.experiments.classifier``):
class accuracy of class-conditional samples and Fréchet distance to real images in the judge's
feature space. Mean ± std over seeds; a figure of the samples and one of the loss curves.

    python -m jitfast.experiments.transfer [--quick] [--out runs/transfer]
"""
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw

from jitfast.diffusion.denoiser import Denoiser
from jitfast.experiments import cached, mean_std, pyplot, seeded_experiment_main, write_results
from jitfast.experiments.classifier import trained_judges
from jitfast.io.images import image_grid, save_png, to_uint8
from jitfast.network.model import JiT
from jitfast.network.transfer import transfer
from jitfast.training.loop import fit
from jitfast.training.shapes import ShapesDataset

NETWORK = dict(hidden_size=96, depth=4, num_heads=4, bottleneck_dim=32, in_context_len=4,
               in_context_start=1, num_classes=10, backend="torch")
PARENT, CHILD = (32, 4, 1.0), (64, 8, 2.0)  # image size, patch size, noise scale
ARMS = ("transferred", "transferred + N", "scratch N", "scratch P + N")
JUDGES = ("colour", "colour-blind")
FULL = dict(parent_steps=300, steps=150, batch=16, lr=2e-3, ema=0.98, samples_per_class=10,
            sample_steps=10, classifier_steps=300, colour_blind_steps=800, seeds=(0, 1, 2))
QUICK = dict(parent_steps=6, steps=4, batch=4, lr=2e-3, ema=0.98, samples_per_class=1,
             sample_steps=2, classifier_steps=4, colour_blind_steps=4, seeds=(0, 1))
JUDGE_SEED = 7
CHILD_DATA = 1000  # children's data seed offset: images the parent never saw


def new_denoiser(resolution, seed):
    size, patch, noise_scale = resolution
    torch.manual_seed(seed)
    net = JiT(input_size=size, patch_size=patch, **NETWORK)
    net.check_values = False
    return Denoiser(net, noise_scale=noise_scale)


def train_on_shapes(denoiser, steps, config, data_seed):
    """Train `denoiser` in place on fresh shapes images (jitfast.training.loop.fit); returns its
    EMA, started from its current weights, and the loss of every step."""
    torch.manual_seed(data_seed)  # times, noise and label drops
    data = ShapesDataset(denoiser.net.input_size, steps * config["batch"], data_seed)
    return fit(denoiser, data, steps, config["batch"], config["lr"], config["ema"])


def sample(denoiser, ema, labels, config, seed):
    """Class-conditional samples (Heun, no guidance) of the EMA weights (of the weights as they
    are, when ema is None), clamped to [-1, 1]."""
    denoiser.eval()
    with ema.swapped(1) if ema is not None else nullcontext():
        return denoiser.generate(labels, config["sample_steps"],
                                 generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def run_seed(seed, config, labels, log):
    """Train the parent and the four children of one seed; (samples by arm, losses by arm)."""
    parent = new_denoiser(PARENT, seed)
    parent_ema, parent_losses = train_on_shapes(parent, config["parent_steps"], config, seed)
    with parent_ema.swapped(1):
        child_net = transfer(parent.net, CHILD[0], CHILD[1])
    log(f"seed {seed}: parent trained, final loss {np.mean(parent_losses[-20:]):.4f}")
    samples, losses = {}, {"parent (32 px)": parent_losses}
    transferred = Denoiser(child_net, noise_scale=CHILD[2])
    samples["transferred"] = sample(transferred, None, labels, config, seed)
    transferred.train()
    ema, losses["transferred + N"] = train_on_shapes(transferred, config["steps"], config,
                                                     CHILD_DATA + seed)
    samples["transferred + N"] = sample(transferred, ema, labels, config, seed)
    for arm, steps in (("scratch N", config["steps"]),
                       ("scratch P + N", config["parent_steps"] + config["steps"])):
        scratch = new_denoiser(CHILD, seed)
        ema, losses[arm] = train_on_shapes(scratch, steps, config, CHILD_DATA + seed)
        samples[arm] = sample(scratch, ema, labels, config, seed)
        log(f"seed {seed}: {arm} trained, final loss {np.mean(losses[arm][-20:]):.4f}")
    return samples, losses


def real_by_class(count):
    """`count` real 64-px images (the colour judge's reference set), ordered by class."""
    real, labels = ShapesDataset(CHILD[0], count, seed=JUDGE_SEED + 1).batch(range(count))
    return real[torch.argsort(labels, stable=True)]


def titled(image, title):
    """An (H, W, 3) uint8 image with a 14-px white title strip above it."""
    panel = Image.new("RGB", (image.shape[1], image.shape[0] + 14), "white")
    panel.paste(Image.fromarray(image), (0, 14))
    ImageDraw.Draw(panel).text((2, 1), title, fill="black")
    return np.asarray(panel)


def sample_figure(samples, real, config, columns=4):
    """One panel per arm and one of real images: a row per class, `columns` samples each."""
    per_class = config["samples_per_class"]
    columns = min(columns, per_class)
    keep = [c * per_class + i for c in range(10) for i in range(columns)]
    panels = [titled(image_grid(to_uint8(images[keep]), columns), name)
              for name, images in (*samples.items(), ("real", real))]
    gap = np.full((panels[0].shape[0], 6, 3), 255, dtype=np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)


def loss_figure(losses, config, path):
    """Mean loss over seeds (moving average of 20 steps) against total training steps: the
    fine-tuned child is drawn after its parent's P steps."""
    plt = pyplot("the loss figure")
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, curves in losses.items():
        curve = np.mean(curves, axis=0)
        smooth = np.convolve(curve, np.ones(20) / 20, mode="valid") if len(curve) >= 20 else curve
        offset = config["parent_steps"] if arm == "transferred + N" else 0
        ax.plot(offset + np.arange(len(smooth)) + 1, smooth, label=arm,
                linestyle="--" if arm.startswith("parent") else "-")
    ax.set_xlabel("training steps (the fine-tuned child after its parent's)")
    ax.set_ylabel("v-loss (mean of seeds, 20-step average)")
    ax.set_title("64 px children (noise 2); the parent at 32 px (noise 1), dashed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results, reference, config):
    lines = ["| child at 64 px (patch 8) | steps at 64 px | "
             + " | ".join(f"{j} accuracy | {j} Fréchet" for j in JUDGES) + " |",
             "| --- | --- |" + " --- | --- |" * len(JUDGES)]
    steps = {"transferred": 0, "transferred + N": config["steps"], "scratch N": config["steps"],
             "scratch P + N": config["parent_steps"] + config["steps"]}
    for arm in ARMS:
        cells = [f"{results[arm][j][m]['mean']:.3f} ± {results[arm][j][m]['std']:.3f}"
                 if m == "accuracy" else
                 f"{results[arm][j][m]['mean']:.1f} ± {results[arm][j][m]['std']:.1f}"
                 for j in JUDGES for m in ("accuracy", "frechet")]
        lines.append(f"| {arm} | {steps[arm]} | " + " | ".join(cells) + " |")
    lines.append("| real images | - | " + " | ".join(
        f"{reference[j]['accuracy']:.3f} | {reference[j]['frechet']:.1f} (floor)"
        for j in JUDGES) + " |")
    return "\n".join(lines)


def run(config, out, part="all", seeds=None):
    """The experiment; part "judges" or "seeds" (those of `seeds`, default all) only trains
    and saves that part in `out`, for processes run side by side; "all" uses what they saved."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:5.0f}s] {message}", flush=True)

    labels = torch.arange(10).repeat_interleave(config["samples_per_class"])

    def seed_run(seed):
        return cached(os.path.join(out, f"seed{seed}.pt"), config,
                      lambda: run_seed(seed, config, labels, log))

    if part == "seeds":
        return [seed_run(seed) for seed in seeds or config["seeds"]]
    judged = trained_judges(CHILD[0], len(labels), JUDGE_SEED, dict(zip(JUDGES, (
        config["classifier_steps"], config["colour_blind_steps"]))), cache=out)
    if part == "judges":
        return judged
    reference = {j: judged[j].reference() for j in JUDGES}
    for j in JUDGES:
        log(f"{j} judge: real accuracy {reference[j]['accuracy']:.3f}, Fréchet real vs real "
            f"{reference[j]['frechet']:.1f}")
    scores = {arm: {j: {"accuracy": [], "frechet": []} for j in JUDGES} for arm in ARMS}
    losses = {}
    for seed in config["seeds"]:
        samples, seed_losses = seed_run(seed)
        for arm in ARMS:
            for j in JUDGES:
                for metric, value in judged[j].score(samples[arm], labels).items():
                    scores[arm][j][metric].append(value)
            log(f"seed {seed} {arm}: " + ", ".join(
                f"{j} {scores[arm][j]['accuracy'][-1]:.3f} / {scores[arm][j]['frechet'][-1]:.1f}"
                for j in JUDGES))
        for arm, curve in seed_losses.items():
            losses.setdefault(arm, []).append(curve)
        if seed == config["seeds"][0]:
            save_png(sample_figure(samples, real_by_class(len(labels)), config),
                     os.path.join(out, "samples.png"))
    results = {arm: {j: {m: mean_std(v) for m, v in by_metric.items()}
                     for j, by_metric in by_judge.items()} for arm, by_judge in scores.items()}
    loss_figure(losses, config, os.path.join(out, "loss.png"))
    seconds = round(time.perf_counter() - start, 1)
    table = markdown_table(results, reference, config)
    write_results(out, "transfer", table, config, seconds,
                  {"network": NETWORK, "reference": reference, "results": results,
                   "scores": scores, "losses": losses})
    log(f"wrote {out}/table.md, transfer.json, samples.png and loss.png")
    return results


def main(argv=None):
    seeded_experiment_main(argv, "jitfast.experiments.transfer", __doc__, run, QUICK, FULL,
                           "about a minute", "runs/transfer")


if __name__ == "__main__":
    main()
