"""Reproductions of the JiT paper's evidence at CPU scale: the toy manifold experiment (Figure 2,
``toy``), the prediction-target x loss-space table (Table 2, ``targets``), resolution transfer
(``transfer``), the samplers' error against evaluations (``samplers``) and the quick start's
score (``quickstart``); results and their reading in docs/experiments.md and docs/samplers.md."""
import argparse
import json
import os
import statistics

import torch

from jitfast.io.checkpoint import atomic_save


def pyplot(figure):
    """matplotlib.pyplot on the file-only Agg backend, or an exit naming the extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"{figure} needs matplotlib (pip install 'jitfast[plot]'): {err}")
    return plt


def mean_std(values):
    """{"mean", "std"} of a list of numbers (the sample std; 0 for one value)."""
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def cached(path, config, make):
    """make(), saved to `path` with the config; or what a run with this config (an earlier one,
    or a process running beside this one) saved there."""
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        if saved["config"] != config:
            raise ValueError(f"{path} holds a run with another config ({saved['config']}); "
                             f"remove it or choose another --out")
        return saved["value"]
    value = make()
    atomic_save({"config": config, "value": value}, path)
    return value


def seeded_experiment_main(argv, module, doc, run, quick, full, quick_time, out, settings=()):
    """The command line of an experiment run over seeds in parts (targets, transfer): --quick,
    --out, and --part/--seeds to train the judges and the seeds in parallel processes; then
    run(config, out, part, seeds) on one thread (small matmuls: more threads mostly wait for
    each other). `settings`: the names --settings chooses among (all by default), if any."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a reduced run ({quick_time}): {quick}; default {full}")
    p.add_argument("--out", default=out, help="folder for the table and figures")
    p.add_argument("--part", default="all", choices=("all", "judges", "seeds"),
                   help="train only the judges or the --seeds' models, saving them in --out, "
                        "to run parts in parallel processes; all: the rest, then the results")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --part seeds: which of the config's seeds")
    if settings:
        p.add_argument("--settings", nargs="+", choices=settings, default=list(settings),
                       help="which settings to run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    chosen = {"settings": tuple(args.settings)} if settings else {}
    return run(quick if args.quick else full, args.out, part=args.part, seeds=args.seeds,
               **chosen)


def write_results(out, name, table, config, seconds, record):
    """`out`/table.md (the table, the config and the run's time) and `out`/<name>.json (the
    record, with the config and the time); the table is printed too."""
    threads = torch.get_num_threads()
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{table}\n\n{config}; {seconds} s on {threads} thread(s).\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"config": config, **record, "seconds": seconds}, f, indent=1)
    print(table)
