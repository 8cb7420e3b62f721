"""ODE sampling of the flow from t = 0 (noise) to t = 1 (image): the official JiT sampler (Heun
or Euler on the linear grid) and exponential integrators of the same ODE in fewer evaluations
(docs/design.md §7), guidance inside an interval of t, eager or replayed as one CUDA graph. The
state stays float32 whatever the network's dtype.

    evaluation  one network evaluation (guided velocity, fused state update, conditioning)
    official    Heun / Euler on the linear grid
    schedules   time grids of the exponential methods, guidance per step
    multistep   DDIM, DPM-Solver++(2M/3M)-style and UniPC-style steps in λ
    trajectory  whole runs: generate, invert, CUDA-graph capture and its cache
"""
from jitfast.diffusion.sampling.evaluation import (CONDITIONING_BUDGET, network_step,
                                                   trajectory_conditioning)
from jitfast.diffusion.sampling.multistep import EXPONENTIAL_METHODS, MultistepTimeGrid
from jitfast.diffusion.sampling.official import TimeGrid, guidance_weights
from jitfast.diffusion.sampling.schedules import SCHEDULES
from jitfast.diffusion.sampling.trajectory import (METHODS, OFFICIAL_METHODS, CapturedTrajectory,
                                                   GraphCache, check_labels, check_settings,
                                                   generate, integrate, invert, make_time_grid)

__all__ = ["CONDITIONING_BUDGET", "EXPONENTIAL_METHODS", "METHODS", "OFFICIAL_METHODS",
           "SCHEDULES", "CapturedTrajectory", "GraphCache", "MultistepTimeGrid", "TimeGrid",
           "check_labels", "check_settings", "generate", "guidance_weights", "integrate", "invert",
           "make_time_grid", "network_step", "trajectory_conditioning"]
