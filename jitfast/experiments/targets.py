"""The paper's Table 2 in miniature: prediction target (x, e, v) x loss space (x, e, v) for a JiT
whose patch vectors are larger than its hidden size, on the built-in shapes and on real images
(the built-in Fashion-MNIST subset).

Settings, same network (4 blocks, hidden 64):
  bottleneck          shapes, 32 px, patch 8: 192-d patch vectors through a 16-d bottleneck and
                      a 64-d hidden size (as JiT-B/16 squeezes 768-d patches through 128), all 9
                      cells, 16 tokens;
  control             shapes, 16 px, patch 4: 48-d patch vectors, bottleneck 48, hidden 64
                      (nothing to squeeze, as JiT-B/4 at 64 px in the paper), the 3 prediction
                      targets with the v-loss, 16 tokens;
  fashion-bottleneck  Fashion-MNIST, 28 px, patch 7: 147-d patch vectors, bottleneck 16, hidden
                      64, the 3 targets with the v-loss, 16 tokens;
  fashion-control     Fashion-MNIST, 28 px, patch 4: 48-d patch vectors, bottleneck 48, hidden
                      64: the same images with nothing to squeeze, 49 tokens.
Quality of class-conditional samples, judged by small CNNs (``jitfast.experiments.classifier``):
on the shapes one trained on the same dataset and its colour-blind twin, on Fashion-MNIST one
trained on its test split; class accuracy on them, and the Fréchet distance in each judge's
feature space to held-out real images (an FID with that CNN, at this sample size); mean ± std
over 3 seeds (training data order, initialisation and sampling noise).

    python -m jitfast.experiments.targets [--quick] [--out runs/targets] [--part seeds --seeds 1]
        [--settings fashion-bottleneck fashion-control]
"""
import os
import time

import torch

from jitfast.diffusion.denoiser import SPACES, Denoiser
from jitfast.experiments import cached, mean_std, seeded_experiment_main, write_results
from jitfast.experiments.classifier import fashion_images, fashion_judges, trained_judges
from jitfast.io.images import image_grid, save_png, to_uint8
from jitfast.network.model import JiT
from jitfast.training.loop import fit
from jitfast.training.shapes import ShapesDataset

NETWORK = dict(hidden_size=64, depth=4, num_heads=4, in_context_len=4, in_context_start=1,
               num_classes=10, backend="torch")
V_LOSS = [(p, "v") for p in SPACES]
SETTINGS = {  # name: (data, image size, patch size, bottleneck dim, cells as (pred, loss))
    "bottleneck": ("shapes", 32, 8, 16, [(p, l) for p in SPACES for l in SPACES]),
    "control": ("shapes", 16, 4, 48, V_LOSS),
    "fashion-bottleneck": ("fashion-mnist", 28, 7, 16, V_LOSS),
    "fashion-control": ("fashion-mnist", 28, 4, 48, V_LOSS),
}
JUDGES = {"shapes": ("colour", "colour-blind"), "fashion-mnist": ("test split",)}
FULL = dict(steps=800, batch=32, samples_per_class=20, sample_steps=25, classifier_steps=300,
            colour_blind_steps=800, fashion_judge_steps=2000, seeds=(0, 1, 2))
QUICK = dict(steps=60, batch=16, samples_per_class=4, sample_steps=5, classifier_steps=100,
             colour_blind_steps=100, fashion_judge_steps=100, seeds=(0,))


class FashionBatches:
    """The built-in Fashion-MNIST subset as ``fit`` reads data: batch(indices) of float images,
    the subset shuffled by `seed` and repeated."""

    def __init__(self, size, seed):
        self.images, self.labels = fashion_images("train", size)
        self.order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))

    def batch(self, indices):
        pick = self.order[torch.tensor(list(indices)) % len(self.order)]
        return self.images[pick], self.labels[pick]


def training_data(data, size, images, seed):
    """`images` images of `data` ("shapes": fresh ones; "fashion-mnist": the subset, repeated)."""
    if data == "shapes":
        return ShapesDataset(size, images, seed)
    return FashionBatches(size, seed)


def train_denoiser(data, size, patch, bottleneck, pred, loss, steps, batch, seed=0, lr=3e-3):
    """A Denoiser trained on `data` (jitfast.training.loop.fit); returns (denoiser, its EMA)."""
    torch.manual_seed(seed)
    net = JiT(input_size=size, patch_size=patch, bottleneck_dim=bottleneck, **NETWORK)
    net.check_values = False
    denoiser = Denoiser(net, pred=pred, loss=loss)
    try:
        ema, _ = fit(denoiser, training_data(data, size, steps * batch, seed), steps, batch, lr,
                     0.99)
    except RuntimeError as err:
        raise RuntimeError(f"{pred}-pred/{loss}-loss: {err}") from None
    return denoiser, ema


def sample(denoiser, ema, labels, steps, seed=0):
    """Class-conditional EMA samples (Heun, no guidance) for labels (B,)."""
    with ema.swapped(1):
        return denoiser.generate(labels, steps=steps,
                                 generator=torch.Generator().manual_seed(seed))


def run_seed(name, config, seed, out):
    """{cell: its class-conditional samples} of one setting and seed; the grids of the first
    seed are saved in `out`."""
    data, size, patch, bottleneck, cells = SETTINGS[name]
    labels = torch.arange(10).repeat_interleave(config["samples_per_class"])
    samples = {}
    for pred, loss in cells:
        denoiser, ema = train_denoiser(data, size, patch, bottleneck, pred, loss,
                                       config["steps"], config["batch"], seed)
        images = sample(denoiser, ema, labels, config["sample_steps"], seed)
        samples[f"{pred}-pred/{loss}-loss"] = images
        if seed == config["seeds"][0]:
            grid = image_grid(to_uint8(images.clamp(-1, 1)), columns=config["samples_per_class"])
            save_png(grid, os.path.join(out, f"{name}-{pred}-pred-{loss}-loss.png"))
    return samples


def setting_judges(name, config, out):
    data, size = SETTINGS[name][:2]
    count = 10 * config["samples_per_class"]
    if data == "fashion-mnist":
        judge = fashion_judges(size, count, seeds=(0,), steps=config["fashion_judge_steps"],
                               cache=out)[0]
        return dict(zip(JUDGES[data], [judge]))
    return trained_judges(size, count, seed=1, steps=dict(zip(
        JUDGES[data], (config["classifier_steps"], config["colour_blind_steps"]))), cache=out)


def markdown_table(results):
    """Per setting and judge, a table: rows are prediction targets, columns loss spaces, cells
    'accuracy / Fréchet distance', mean ± std over the seeds; the real-data reference below."""
    lines = []
    for name, by_judge in results.items():
        data, size, patch, bottleneck, _ = SETTINGS[name]
        for j, cells in by_judge.items():
            lines += [f"**{name}**, {j} judge ({data}, {size} px, patch {patch}: "
                      f"{3 * patch * patch}-d "
                      f"patch vectors, bottleneck {bottleneck}, hidden {NETWORK['hidden_size']})"
                      f" - class accuracy (higher is better) / Fréchet distance (lower is "
                      f"better), mean ± std", "",
                      "| prediction | x-loss | e-loss | v-loss |", "| --- | --- | --- | --- |"]
            for pred in SPACES:
                row = [cells.get(f"{pred}-pred/{loss}-loss") for loss in SPACES]
                lines.append(f"| {pred}-pred | " + " | ".join(
                    f"{c['accuracy']['mean']:.2f} ± {c['accuracy']['std']:.2f} / "
                    f"{c['frechet']['mean']:.3g} ± {c['frechet']['std']:.2g}" if c else "-"
                    for c in row) + " |")
            real = cells["real data"]
            lines += ["", f"Real held-out images: accuracy {real['accuracy']:.2f}, Fréchet "
                          f"distance to other real images {real['frechet']:.1f}.", ""]
    return "\n".join(lines)


def run(config, out, settings=tuple(SETTINGS), part="all", seeds=None):
    """The experiment; part "judges" or "seeds" (those of `seeds`, default all) only trains
    and saves that part in `out`, for processes run side by side; "all" uses what they saved."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:5.0f}s] {message}", flush=True)

    def seed_run(name, seed):
        samples = cached(os.path.join(out, f"{name}-seed{seed}.pt"), config,
                         lambda: run_seed(name, config, seed, out))
        log(f"{name} seed {seed}: sampled")
        return samples

    if part == "seeds":
        return [seed_run(name, seed) for name in settings for seed in seeds or config["seeds"]]
    judged = {name: setting_judges(name, config, out) for name in settings}
    if part == "judges":
        return judged
    labels = torch.arange(10).repeat_interleave(config["samples_per_class"])
    scores = {name: {j: {} for j in judged[name]} for name in settings}
    for name in settings:
        for seed in config["seeds"]:
            for cell, images in seed_run(name, seed).items():
                for j in judged[name]:
                    metrics = judged[name][j].score(images, labels)
                    by_metric = scores[name][j].setdefault(cell, {"accuracy": [], "frechet": []})
                    for metric, value in metrics.items():
                        by_metric[metric].append(value)
                log(f"{name} seed {seed} {cell}: " + ", ".join(
                    f"{j} {scores[name][j][cell]['accuracy'][-1]:.3f} / "
                    f"{scores[name][j][cell]['frechet'][-1]:.1f}" for j in judged[name]))
    results = {name: {j: {**{cell: {m: mean_std(v) for m, v in by_metric.items()}
                             for cell, by_metric in cells.items()},
                          "real data": judged[name][j].reference()}
                      for j, cells in by_judge.items()} for name, by_judge in scores.items()}
    table = markdown_table(results)
    seconds = round(time.perf_counter() - start, 1)
    write_results(out, "targets", table, config, seconds, {"results": results, "scores": scores})
    log(f"wrote {out}/table.md, targets.json and the sample grids")
    return results


def main(argv=None):
    seeded_experiment_main(argv, "jitfast.experiments.targets", __doc__, run, QUICK, FULL,
                           "a minute or two", "runs/targets", tuple(SETTINGS))


if __name__ == "__main__":
    main()
