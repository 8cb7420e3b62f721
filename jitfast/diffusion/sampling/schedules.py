"""Time grids of the exponential-integrator samplers, with a grid point on each jump of the
guidance weight w(t), and each step's guidance decided by where the step lies (its midpoint)."""
import math

import torch

from jitfast.diffusion.sampling.official import guidance_weights
from jitfast.functional.ode import ode_time


def linear_times(steps, denoiser):
    """The official grid t_i = i/steps."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


def lambda_times(steps, denoiser):
    """Uniform in the ODE's time λ (dense near t = 1, where the image's details form)."""
    t_eps, top = denoiser.t_eps, ode_time(1.0, denoiser.t_eps)
    knee = -math.log(t_eps)  # λ at t = 1 - t_eps, where λ turns linear
    lam = torch.linspace(0.0, top, steps + 1, dtype=torch.float64)
    return torch.where(lam <= knee, -torch.expm1(-lam), 1.0 - t_eps + (lam - knee) * t_eps)


def cosine_times(steps, denoiser):
    """t = sin²(πu/2) for u uniform: dense at both ends, where the images' layout is decided
    (guided, on a trained JiT) and where their details form."""
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return torch.sin(0.5 * math.pi * u) ** 2


def quantile_times(steps, denoiser):
    """The quantiles i/steps of the training distribution of t, sigmoid(N(P_mean, P_std²))."""
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return torch.sigmoid(denoiser.P_mean + denoiser.P_std * math.sqrt(2) * torch.erfinv(2 * u - 1))


SCHEDULES = {"linear": linear_times, "cosine": cosine_times, "lambda": lambda_times,
             "quantile": quantile_times}


def guidance_jumps(cfg, interval):
    """The times where w(t) jumps: the interval's ends inside (0, 1), when guidance is on."""
    lo, hi = interval
    if cfg == 1.0 or lo >= hi:
        return []
    return [end for end in (lo, hi) if 0.0 < end < 1.0]


def schedule_times(schedule, steps, denoiser, cfg, interval):
    """float32 grid (steps + 1,) from 0 to 1 of the schedule, the interior point nearest each
    jump of w(t) moved onto it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    t = SCHEDULES[schedule](steps, denoiser).float()
    t[0], t[-1] = 0.0, 1.0
    taken = set()
    for jump in guidance_jumps(cfg, interval):
        if steps < 2:
            raise ValueError(f"guidance on the interval {tuple(interval)} needs a grid point on "
                             f"each end inside (0, 1): use at least 2 steps (3 when both ends are)")
        k = 1 + int((t[1:-1] - jump).abs().argmin())
        if k in taken:
            raise ValueError(f"{steps} steps are too few to put a grid point on both ends of the "
                             f"guidance interval {tuple(interval)}: use more steps")
        taken.add(k)
        t[k] = jump
    return t


def step_guidance(times, cfg, interval):
    """Each step's guidance weight, decided at its midpoint (w's jumps lie on grid points)."""
    mid = 0.5 * (times[1:].double() + times[:-1].double())
    return guidance_weights(mid.float(), cfg, interval)
