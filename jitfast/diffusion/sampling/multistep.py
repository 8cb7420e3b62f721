"""Exponential integrators of the official ODE in its time λ (``jitfast.functional.ode``), one
network evaluation per step: DDIM (order 1), the multistep predictors of DPM-Solver++(2M)/(3M) — the
x-predictions of earlier steps extrapolated as a polynomial in λ — and UniPC-style
predictor-correctors, which redo each step with the next step's evaluation in the polynomial
(no evaluation added; the next step starts from the corrected state).

A multistep history never crosses a jump of the guidance weight: the step after one starts
again at order 1, and the step before one is not corrected.
"""
import math
from typing import NamedTuple

import torch

from jitfast.diffusion.sampling.evaluation import network_step, trajectory_conditioning
from jitfast.diffusion.sampling.schedules import schedule_times, step_guidance
from jitfast.functional.ode import exponential_weights, ode_time

# method -> (points of the predictor's polynomial, of the corrector's; 0: no corrector)
EXPONENTIAL_METHODS = {"ddim": (1, 0), "dpm2m": (2, 0), "dpm3m": (3, 0),
                       "unipc2": (2, 3), "unipc3": (3, 4)}


class MultistepTimeGrid(NamedTuple):
    """A run's time grid on the device: times t (steps + 1,), c = max(1 - t, t_eps) at the
    evaluated times (steps,), each step's guidance weight w (steps,), and its coefficients:
    e^(-Δλ) then the predictor's weights on x̂_n, x̂_(n-1), ... (steps, 1 + P), e^(-Δλ) then
    the corrector's on x̂_(n+1), x̂_n, ... (steps, 1 + C); on the host, each step's guidance and
    how many points its predictor and its corrector use."""
    t: torch.Tensor
    c: torch.Tensor
    w: torch.Tensor
    pred: torch.Tensor
    corr: torch.Tensor
    guided: tuple
    predictor: tuple
    corrector: tuple

    @classmethod
    def make(cls, method, steps, schedule, cfg, interval, denoiser, device, reverse=False):
        """Integrating from t = 0 to 1, or from 1 back to 0 (reverse) over the same grid."""
        P, C = EXPONENTIAL_METHODS[method]
        times = schedule_times(schedule, steps, denoiser, cfg, interval)
        weights = step_guidance(times, cfg, interval)
        if reverse:
            times, weights = times.flip(0), weights[::-1]
        lam = [ode_time(float(t), denoiser.t_eps) for t in times]
        starts = [n == 0 or weights[n] != weights[n - 1] for n in range(steps)]  # of a segment
        segment, predictor, corrector, pred, corr = 0, [], [], [], []
        for n in range(steps):
            segment = n if starts[n] else segment
            k = min(P, n - segment + 1)
            m = min(C, n - segment + 2) if C and n + 1 < steps and not starts[n + 1] else 0
            h = lam[n + 1] - lam[n]
            pred.append([math.exp(-h), *exponential_weights(h, [lam[n - i] - lam[n]
                                                                for i in range(k)])]
                        + [0.0] * (P - k))
            corr.append([math.exp(-h), *exponential_weights(h, [lam[n + 1 - i] - lam[n]
                                                                for i in range(m)])]
                        + [0.0] * (C - m))
            predictor.append(k)
            corrector.append(m)
        c = (1 - times[:-1]).clamp_min(denoiser.t_eps)
        return cls(times.to(device), c.to(device),
                   torch.tensor(weights, dtype=torch.float32).to(device),
                   torch.tensor(pred, dtype=torch.float32).to(device),
                   torch.tensor(corr, dtype=torch.float32).to(device),
                   tuple(w != 1.0 for w in weights), tuple(predictor), tuple(corrector))


def combine(coef, z, predictions):
    """coef[0]·z + Σ coef[1 + i]·predictions[i], coef a row of (1,) slices on the device."""
    out = coef[0:1] * z
    for i, x in enumerate(predictions):
        out = out + coef[1 + i:2 + i] * x
    return out


def prediction(denoiser, y, z, time_grid, n, rows):
    """The (guided) x-prediction at step n's start: the fused step with dt = c(t_n)."""
    guided = time_grid.guided[n]
    return network_step(denoiser, y, z, time_grid.t[n:n + 1], time_grid.w[n:n + 1], guided,
                        time_grid.c[n:n + 1], cond=rows(n, guided))[0]


def integrate_multistep(denoiser, y, z, time_grid):
    """The ODE from float32 state z over the time grid, tensor ops only."""
    rows = trajectory_conditioning(denoiser, y, time_grid)
    history, start = [], z  # x̂ newest first; the state at the previous step's start
    for n in range(len(time_grid.predictor)):
        x = prediction(denoiser, y, z, time_grid, n, rows)
        m = time_grid.corrector[n - 1] if n else 0
        if m:  # redo step n - 1 with x̂_n in its polynomial
            z = combine(time_grid.corr[n - 1], start, [x, *history][:m])
        history = [x, *history][:max(time_grid.predictor[n], max(time_grid.corrector))]
        start = z
        z = combine(time_grid.pred[n], z, history[:time_grid.predictor[n]])
    return z

