"""Reproductions of the JiT paper's evidence at CPU scale: the toy manifold experiment (Figure 2,
``toy``), the prediction-target x loss-space table (Table 2, ``targets``), resolution transfer
(``transfer``), the samplers' error against evaluations (``samplers``) and the quick start's
score (``quickstart``); results and their reading in docs/experiments.md and docs/samplers.md."""
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
