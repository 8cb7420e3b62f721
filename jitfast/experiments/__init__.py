"""Reproductions of the JiT paper's evidence at CPU scale: the toy manifold experiment (Figure 2,
``toy``) and the prediction-target x loss-space table (Table 2, ``targets``); results and their
reading in docs/experiments.md."""
