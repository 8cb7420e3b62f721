"""Reproductions of the JiT paper's evidence at CPU scale: the toy manifold experiment (Figure 2,
``toy``), the prediction-target x loss-space table (Table 2, ``targets``), resolution transfer
(``transfer``) and the samplers' error against evaluations (``samplers``); results and their
reading in docs/experiments.md and docs/samplers.md."""


def pyplot(figure):
    """matplotlib.pyplot on the file-only Agg backend, or an exit naming the extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"{figure} needs matplotlib (pip install 'jitfast[plot]'): {err}")
    return plt
