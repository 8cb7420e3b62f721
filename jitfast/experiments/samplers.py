"""The samplers measured (docs/samplers.md): on Gaussian data against the exact answer (the
clamped ODE with the optimal denoiser, ``gaussian``); on a trained JiT, the error of the final
images against a 400-step Heun reference at 5 to 100 network evaluations, guided and unguided,
and both CNN judges, colour and colour-blind (class accuracy, Fréchet distance; ``classifier``),
by evaluations.

    python -m jitfast.experiments.samplers --ckpt runs/jitfast/checkpoint-00000600.pt \
        --out runs/samplers [--part gaussian errors judge inversion grid plot] [--images 10] \
        [--judge-images 100] [--fast unipc2 cosine] [--grid-steps 15]

Every result goes into OUT/results.json as soon as it is measured (a rerun skips what is there,
the references are cached in OUT), tables into OUT/tables.md and the plot (the ``plot`` extra,
matplotlib) into OUT/errors.png.
"""
import argparse
import json
import os
import time

import torch

from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.experiments import pyplot
from jitfast.experiments.classifier import trained_judges
from jitfast.experiments.gaussian import gaussian_denoiser, reference_images

GUIDED, UNGUIDED = (3.0, (0.1, 1.0)), (1.0, (0.0, 1.0))  # (cfg, interval)
REFERENCE_STEPS = 400  # Heun
EVALUATIONS = (5, 7, 10, 12, 15, 20, 30)
HEUN_STEPS = (3, 5, 8, 13, 25, 50)  # 5 to 99 evaluations
SOLVERS = {"guided": [("unipc2", "cosine"), ("unipc3", "cosine"), ("dpm2m", "cosine"),
                      ("unipc2", "linear"), ("ddim", "linear"), ("unipc2", "lambda"),
                      ("dpm2m", "lambda"), ("unipc3", "lambda"), ("dpm3m", "lambda")],
           "unguided": [("unipc2", "cosine"), ("unipc2", "linear"), ("unipc2", "lambda"),
                        ("dpm2m", "lambda"), ("ddim", "linear")]}
JUDGE_HEUN_STEPS = (3, 5, 8, 13, 25, 50)  # 5, 9, 15, 25, 49 and 99 evaluations
JUDGE_EVALUATIONS = (5, 10, 15, 25, 50, 99)
ERROR_TABLES = ("gaussian guided", "gaussian unguided", "errors guided", "errors unguided")


def evaluations(method, steps):
    """Network evaluations of a run (guided ones count once: cond + uncond are one batch)."""
    return 2 * steps - 1 if method == "heun" else steps


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Results:
    """results.json as a dict of dicts, written after every new entry."""

    def __init__(self, path):
        self.path = path
        self.data = json.load(open(path)) if os.path.exists(path) else {}

    def get(self, table, key, measure):
        row = self.data.setdefault(table, {})
        if key not in row:
            row[key] = measure()
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
            print(table, key, row[key], flush=True)
        return row[key]


def timed_generate(denoiser, y, z0, method, steps, schedule, cfg, interval):
    start = time.perf_counter()
    images = denoiser.generate(y, steps, method, cfg, interval, z0=z0, schedule=schedule)
    return images, time.perf_counter() - start


def cached(path, make):
    if not os.path.exists(path):
        torch.save(make(), path)
    return torch.load(path)


def error_tables(denoiser, results, out, images):
    """Per guidance setting: {"method/schedule/evaluations": [error, seconds]}."""
    y = torch.arange(images) % denoiser.num_classes
    z0 = torch.randn(images, 3, denoiser.net.input_size, denoiser.net.input_size,
                     generator=torch.Generator().manual_seed(0))
    for name, (cfg, interval) in (("guided", GUIDED), ("unguided", UNGUIDED)):
        runs = [("heun", "linear", s) for s in HEUN_STEPS]
        runs += [(m, s, n) for m, s in SOLVERS[name] for n in EVALUATIONS]
        reference = cached(os.path.join(out, f"reference-{name}-{images}.pt"), lambda: (
            timed_generate(denoiser, y, z0, "heun", REFERENCE_STEPS, "linear", cfg, interval)[0]))
        for method, schedule, steps in runs:
            def measure():
                images, seconds = timed_generate(denoiser, y, z0, method, steps, schedule, cfg,
                                                 interval)
                return [relative_error(images, reference), seconds]
            results.get(f"errors {name}", f"{method}/{schedule}/{evaluations(method, steps)}",
                        measure)


def gaussian_tables(results):
    """The error tables of Gaussian data (3x8x8 images, 8 of them), the reference exact."""
    denoiser = gaussian_denoiser()
    y = torch.arange(8) % 3
    z0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    solvers = [(m, s) for m in ("ddim", "dpm2m", "dpm3m", "unipc2", "unipc3")
               for s in ("linear", "lambda")]
    for name, (cfg, interval) in (("guided", GUIDED), ("unguided", UNGUIDED)):
        reference = reference_images(denoiser, y, z0, cfg, interval)
        runs = [("heun", "linear", s) for s in (3, 5, 8, 13, 25, 50)]
        runs += [(m, s, n) for m, s in solvers for n in (5, 7, 10, 15, 20, 30, 50, 100)]
        for method, schedule, steps in runs:
            def measure():
                images, seconds = timed_generate(denoiser, y, z0, method, steps, schedule, cfg,
                                                 interval)
                return [relative_error(images, reference), seconds]
            results.get(f"gaussian {name}",
                        f"{method}/{schedule}/{evaluations(method, steps)}", measure)


def judge_table(denoiser, results, images, fast, cache):
    """Class accuracy and Fréchet distance (vs held-out real images) of unguided samples by
    both judges (colour, colour-blind), by method and evaluations; the real-data floor."""
    size = denoiser.net.input_size
    judges = trained_judges(size, images, seed=1, cache=cache)
    labels = torch.arange(images) % denoiser.num_classes
    results.get("judges", "real data", lambda: [
        value for j in judges.values() for value in j.reference().values()] + [0.0])
    z0 = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    runs = [("heun", "linear", s) for s in JUDGE_HEUN_STEPS]
    runs += [(*fast, n) for n in JUDGE_EVALUATIONS]
    for method, schedule, steps in runs:
        def measure():
            samples, seconds = timed_generate(denoiser, labels, z0, method, steps, schedule,
                                              *UNGUIDED)
            return [value for j in judges.values()
                    for value in j.score(samples, labels).values()] + [seconds]
        results.get("judges", f"{method}/{schedule}/{evaluations(method, steps)}", measure)


def inversion_table(denoiser, results, images, fast):
    """Round trips invert(generate(z0)) against z0, unguided, by steps."""
    y = torch.arange(images) % denoiser.num_classes
    z0 = torch.randn(images, 3, denoiser.net.input_size, denoiser.net.input_size,
                     generator=torch.Generator().manual_seed(2))
    for method, schedule in (("heun", "linear"), fast):
        for steps in (10, 25, 50):
            def measure():
                images = denoiser.generate(y, steps, method, z0=z0, schedule=schedule)
                back = denoiser.invert(images, y, steps, method, schedule=schedule)
                return [relative_error(back, z0), evaluations(method, steps)]
            results.get("inversion", f"{method}/{schedule}/{steps}", measure)


def grid_time(denoiser, results, fast, steps):
    """Seconds for the quick start's sample grid (80 images, CFG 4.0 throughout) with the fast
    setting, one batch as jitfast.train samples it."""
    y = torch.arange(10).repeat_interleave(8)
    def measure():
        start = time.perf_counter()
        denoiser.generate(y, steps, fast[0], 4.0, generator=torch.Generator().manual_seed(0),
                          schedule=fast[1])
        return [time.perf_counter() - start, torch.get_num_threads()]
    results.get("grid seconds", f"{fast[0]}/{fast[1]}/{steps}", measure)


def markdown(results):
    lines = []
    for name in ERROR_TABLES:
        table = results.get(name, {})
        if not table:
            continue
        columns = sorted({int(k.split("/")[2]) for k in table})
        rows = dict.fromkeys("/".join(k.split("/")[:2]) for k in table)
        against = "the exact answer" if name.startswith("gaussian") else \
            f"Heun-{REFERENCE_STEPS}"
        lines += [f"**{name}**: relative L2 error of the final images vs {against}, by network "
                  f"evaluations", "",
                  "| solver | " + " | ".join(map(str, columns)) + " |",
                  "| --- |" + " --- |" * len(columns)]
        for row in rows:
            cells = [table.get(f"{row}/{n}") for n in columns]
            lines.append(f"| {row} | " + " | ".join(
                "" if c is None else f"{c[0]:.2e}" for c in cells) + " |")
        lines.append("")
    judged = results.get("judges", {})
    if judged:
        lines += ["| sampler | evaluations | colour accuracy | colour Fréchet | colour-blind "
                  "accuracy | colour-blind Fréchet | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, (*scores, seconds) in judged.items():
            sampler, evals = ("real data", "") if key == "real data" else (
                "/".join(key.split("/")[:2]), key.split("/")[2])
            lines.append(f"| {sampler} | {evals} | " + " | ".join(
                f"{v:.3f}" if i % 2 == 0 else f"{v:.1f}" for i, v in enumerate(scores))
                + f" | {seconds:.1f} |")
    if results.get("inversion"):
        lines += ["", "| sampler | steps | evaluations each way | round-trip error |",
                  "| --- | --- | --- | --- |"]
        for key, (error, evals) in results["inversion"].items():
            method, schedule, steps = key.split("/")
            lines.append(f"| {method}/{schedule} | {steps} | {evals} | {error:.2e} |")
    if results.get("grid seconds"):
        lines += ["", "| grid sampler | seconds | threads |", "| --- | --- | --- |"]
        for key, (seconds, threads) in results["grid seconds"].items():
            lines.append(f"| {key} | {seconds:.1f} | {threads} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    plt = pyplot("the plot")
    names = [name for name in ERROR_TABLES if results.get(name)]
    figure, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        table = results[name]
        for row in dict.fromkeys("/".join(k.split("/")[:2]) for k in table):
            points = sorted((int(k.split("/")[2]), v[0]) for k, v in table.items()
                            if k.startswith(row + "/"))
            ax.loglog(*zip(*points), "o-" if row.startswith("heun") else ".-", label=row,
                      linewidth=2.5 if row.startswith("heun") else 1)
        heun50 = table.get("heun/linear/99")
        if heun50:
            ax.axhline(heun50[0], color="gray", linestyle=":", label="Heun-50")
        guided = "CFG 3.0 on [0.1, 1]" if name.endswith(" guided") else "no CFG"
        against = "exact" if name.startswith("gaussian") else f"Heun-{REFERENCE_STEPS}"
        ax.set_title(f"{name.replace('errors', 'trained JiT')}, {guided}", fontsize=9)
        ax.set_xlabel("network evaluations")
        ax.set_ylabel(f"relative L2 error vs {against}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.experiments.samplers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default="runs/samplers")
    p.add_argument("--part", nargs="+", default=["gaussian", "errors", "judge", "plot"],
                   choices=("gaussian", "errors", "judge", "inversion", "grid", "plot"))
    p.add_argument("--images", type=int, default=10, help="images of the error tables")
    p.add_argument("--judge-images", type=int, default=100, help="images per judged sampler")
    p.add_argument("--fast", nargs=2, default=("unipc2", "cosine"),
                   metavar=("METHOD", "SCHEDULE"),
                   help="the fast sampler the judge, the inversion and the grid time measure")
    p.add_argument("--grid-steps", type=int, default=15, help="steps of the timed grid")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = Results(os.path.join(args.out, "results.json"))
    if "gaussian" in args.part:
        gaussian_tables(results)
    denoiser = denoiser_from_checkpoint(args.ckpt, "ema1", backend="torch")
    if "errors" in args.part:
        error_tables(denoiser, results, args.out, args.images)
    if "judge" in args.part:
        judge_table(denoiser, results, args.judge_images, tuple(args.fast),
                    os.path.join(args.out, "judges"))
    if "inversion" in args.part:
        inversion_table(denoiser, results, args.images, tuple(args.fast))
    if "grid" in args.part:
        grid_time(denoiser, results, tuple(args.fast), args.grid_steps)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(markdown(results.data))
    if "plot" in args.part:
        plot(results.data, os.path.join(args.out, "errors.png"))


if __name__ == "__main__":
    main()
