"""The official JiT sampler: Heun steps and a last Euler step (or Euler throughout) on the
linear grid, guidance decided at each evaluation's time."""
from typing import NamedTuple

import torch

from jitfast.diffusion.sampling.evaluation import network_step, trajectory_conditioning


def guidance_weights(timesteps, cfg, interval):
    """w(t) per time: cfg where t < hi and (lo == 0 or t > lo), else 1 (float32 compare)."""
    lo, hi = interval
    inside = (timesteps < hi) & ((lo == 0) | (timesteps > lo))
    return torch.where(inside, cfg, 1.0).tolist()


class TimeGrid(NamedTuple):
    """A run's linear time grid on the device: times t (steps + 1,) float32 from 0 to 1 (or
    back, for inversion), steps dt (steps,), guidance weights w (steps + 1,) and, on the host,
    where guidance is on."""
    t: torch.Tensor
    dt: torch.Tensor
    w: torch.Tensor
    guided: tuple

    @classmethod
    def make(cls, steps, cfg, interval, device, reverse=False):
        timesteps = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
        if reverse:
            timesteps = timesteps.flip(0)
        weights = guidance_weights(timesteps, cfg, interval)
        t = timesteps.to(device)
        return cls(t, t[1:] - t[:-1], torch.tensor(weights, dtype=torch.float32).to(device),
                   tuple(w != 1.0 for w in weights))

    def evaluations(self, method):
        """(step i, grid index k, Heun's second?) of each network evaluation, in order: at t_i,
        then for Heun (all but the last step, which is Euler) at t_(i+1)."""
        steps = len(self.dt)
        for i in range(steps):
            yield i, i, False
            if method == "heun" and i < steps - 1:
                yield i, i + 1, True


def integrate_official(denoiser, y, z, time_grid, method):
    """Heun or Euler from float32 state z over the time grid."""
    rows = trajectory_conditioning(denoiser, y, time_grid)
    last = len(time_grid.dt) - 1
    v = base = None
    for i, k, second in time_grid.evaluations(method):
        guided = time_grid.guided[k]
        state, v_new = network_step(denoiser, y, z, time_grid.t[k:k + 1], time_grid.w[k:k + 1],
                                    guided, time_grid.dt[i:i + 1],
                                    *((v, base) if second else ()), cond=rows(k, guided))
        if not second and method == "heun" and i < last:  # Heun's second evaluation follows
            v, base = v_new, z
        z = state
    return z

