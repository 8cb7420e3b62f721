"""Gaussian data, where the sampler's answer is known: class k's images are
N(mean_k, diag(std²)) per pixel, so the optimal x-prediction E[x | z_t] is affine in z and the
ODE's flow is closed-form while 1 - t >= t_eps (z_t = t·μ + r(t)·z_0/σ,
r² = t²s² + (1 - t)²σ², σ the noise scale). Past 1 - t_eps the clamped ODE leaves that flow,
so the reference integrates it finely.

The null class is its own Gaussian (not the mixture of the classes), which keeps the guided
prediction affine too: guidance then changes the ODE, not its difficulty.
"""
import torch
import torch.nn as nn

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.sampling import guidance_weights


class GaussianNet(nn.Module):
    """The exact x-prediction E[x | z_t, class] as a network: means (K + 1, C, H, W) (the last
    row is the null class), std (C, H, W); the noise scale σ of the denoiser that uses it."""

    def __init__(self, means, std, noise_scale):
        super().__init__()
        self.means, self.std, self.sigma = means.double(), std.double(), noise_scale
        self.num_classes = means.shape[0] - 1
        self.in_channels, self.input_size = means.shape[1], means.shape[-1]
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float32))  # the sampler's dtype

    def forward(self, z, t, y):
        return self.predict(z.double(), t.double().view(-1, 1, 1, 1), y).float()

    def predict(self, z, t, y):
        mean, var = self.means[y], self.std ** 2
        return mean + t * var / (t ** 2 * var + (1 - t) ** 2 * self.sigma ** 2) * (z - t * mean)

    def flow(self, z0, t, y):
        """The unclamped ODE's state at time t from the standard-normal start z0."""
        mean, var = self.means[y], self.std ** 2
        return t * mean + (t ** 2 * var + (1 - t) ** 2 * self.sigma ** 2).sqrt() * z0.double()


def gaussian_denoiser(classes=3, channels=3, size=8, noise_scale=1.0, t_eps=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.rand(classes + 1, channels, size, size, generator=generator) * 1.6 - 0.8
    std = 0.05 + 0.45 * torch.rand(channels, size, size, generator=generator)
    return Denoiser(GaussianNet(means, std, noise_scale), noise_scale=noise_scale, t_eps=t_eps)


def reference_images(denoiser, y, z0, cfg=1.0, interval=(0.0, 1.0), steps_per_piece=1000,
                     end=1.0):
    """The clamped, guided ODE from t = 0 to `end` in float64 by RK4, each piece between w's
    jumps and the clamp's start 1 - t_eps integrated on its own (the velocity is smooth inside)."""
    net, t_eps = denoiser.net, denoiser.t_eps
    null = torch.full_like(y, net.num_classes)
    lo, hi = interval
    breaks = sorted({0.0, end, *(b for b in (1.0 - t_eps, lo, hi) if 0 < b < end)})

    def velocity(z, t, w):
        tt = torch.full((z.shape[0], 1, 1, 1), t, dtype=torch.float64)
        x = net.predict(z, tt, null) + w * (net.predict(z, tt, y) - net.predict(z, tt, null))
        return (x - z) / max(1.0 - t, t_eps)

    z = denoiser.noise_scale * z0.double()
    for a, b in zip(breaks[:-1], breaks[1:]):
        w = guidance_weights(torch.tensor([0.5 * (a + b)]), cfg, interval)[0]
        dt = (b - a) / steps_per_piece
        for i in range(steps_per_piece):
            t = a + i * dt
            k1 = velocity(z, t, w)
            k2 = velocity(z + 0.5 * dt * k1, t + 0.5 * dt, w)
            k3 = velocity(z + 0.5 * dt * k2, t + 0.5 * dt, w)
            k4 = velocity(z + dt * k3, t + dt, w)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z
