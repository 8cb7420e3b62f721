"""pMF's sampler: from noise at t = 1 to an image at t = 0 in a few network evaluations (one by
default), z ← z - (t - r)·u on the linear grid t_0 = 1 > ... > t_N = 0, guidance being the
network's own input (the scale omega and interval [t_min, t_max], in pMF's time).

With the network on the Triton kernels the update runs in the output head's epilogue: in JiT's
time T = 1 - t, u = -(x̂ - z)/max(1 - T, 0.05) is JiT's velocity negated, and z - (t - r)·u its
Euler step over dT = t - r (``jitfast.kernels.output_head_step``). On CUDA the whole trajectory
replays from one CUDA graph.
"""
from functools import partial
from typing import NamedTuple

import torch

from jitfast.diffusion.denoiser import default_noise_scale
from jitfast.diffusion.sampling import GraphCache, check_labels
from jitfast.network.alignment import padded_once
from jitfast.network.backend import head_kernels
from jitfast.network.pmf import U_T_MIN
from jitfast.network.pmf_presets import PMF_SAMPLING, pmf_preset_of
from jitfast.util.cuda_graphs import CapturedRun


class PMFTimeGrid(NamedTuple):
    """A run's grid on the device: times t (steps + 1,) float32 from 1 to 0 as the official
    ``torch.linspace(1, 0, steps + 1)``, steps h = t_i - t_(i+1) (steps,), and JiT's times
    1 - t (steps + 1,) for the fused update."""
    t: torch.Tensor
    h: torch.Tensor
    jit_t: torch.Tensor

    @classmethod
    def make(cls, steps, device):
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32).to(device)
        return cls(t, t[:-1] - t[1:], 1 - t)


def integrate_pmf(net, y, z, grid, guidance):
    """pMF's steps from float32 state z over the grid, tensor ops only (one CUDA graph captures
    them whole). guidance: (omega, t_min, t_max), (1,) float32 tensors on the device."""
    B = z.shape[0]
    omega, t_min, t_max = (g.expand(B) for g in guidance)
    kernels = head_kernels(net, z.device)
    with padded_once(net):  # the SwiGLU weights padded once for all the steps
        for i in range(len(grid.h)):
            t, h = grid.t[i].expand(B), grid.h[i].expand(B)
            if kernels is not None:  # u and the update in the head's epilogue
                head = partial(kernels.output_head_step, z=z, t=grid.jit_t[i:i + 1],
                               dt=grid.h[i:i + 1], p=net.patch_size, t_eps=U_T_MIN)
                z = net(z, t, h, omega, t_min, t_max, y, head=lambda *w: head(*w)[0])
            else:
                z = z - h.view(-1, 1, 1, 1) * net(z, t, h, omega, t_min, t_max, y)
    return z


class PMFSampler:
    """A PMF network and its sampling settings: the noise scale and the default guidance
    (omega, interval), those of the network's preset (``PMF_SAMPLING``: the official README's)
    unless given; a network of no preset defaults to noise scale 1 (2 from 512 px) and no
    guidance (omega 1).

    max_graphs: how many CUDA graphs (one per batch size, steps, guidance and weights) to keep.
    """

    def __init__(self, net, noise_scale=None, omega=None, interval=None, max_graphs=8):
        preset = pmf_preset_of(net.config)
        scale, default_omega, default_interval = PMF_SAMPLING.get(
            preset, (default_noise_scale(net.input_size), 1.0, (0.0, 1.0)))
        self.net, self.preset = net, preset
        self.noise_scale = scale if noise_scale is None else noise_scale
        self.omega = default_omega if omega is None else omega
        self.interval = tuple(default_interval if interval is None else interval)
        check_guidance(self.omega, self.interval)
        if self.noise_scale <= 0:
            raise ValueError(f"noise_scale must be positive, got {self.noise_scale}")
        self.graph_cache = GraphCache(max_graphs)

    @property
    def num_classes(self):
        return self.net.num_classes

    @property
    def default_guidance(self):
        """A sampling run's guidance unless given: this sampler's omega."""
        return self.omega

    def package_settings(self):
        """The sampler settings an exported package records (``jitfast.export``)."""
        t_min, t_max = self.interval
        return dict(noise_scale=float(self.noise_scale), omega=float(self.omega),
                    t_min=float(t_min), t_max=float(t_max))

    def run_options(self, steps=None, method=None, schedule=None, interval=None):
        """{steps, method, schedule, interval, t_eps} of a sampling run (as ``Denoiser``'s): one
        step unless given, the sampler's interval; no method, schedule or t_eps of JiT's."""
        given = [name for name, value in (("method", method), ("schedule", schedule))
                 if value is not None]
        if given:
            raise ValueError(f"a pMF model, which samples with its own update (z - (t - r)·u, "
                             f"one evaluation a step), without a {' or '.join(given)}")
        return dict(steps=1 if steps is None else steps, method="pmf", schedule=None,
                    interval=tuple(self.interval if interval is None else interval), t_eps=None)

    def check_run(self, options, cfg):
        check_pmf_settings(options["steps"], cfg, options["interval"])

    def sampler_run(self, y, options, cfg, z0, cuda_graphs=None):
        return self.generate(y, options["steps"], cfg, options["interval"], z0=z0,
                             cuda_graphs=cuda_graphs)

    def free_graphs(self):
        self.graph_cache.clear()

    def eval(self):
        self.net.eval()
        return self

    def generate(self, y, steps=1, omega=None, interval=None, z0=None, generator=None,
                 cuda_graphs=None, num_samples=None):
        """Images (float32, NCHW, about [-1, 1]) for labels y (B,) in `steps` evaluations from
        the standard-normal start z0 (drawn from `generator` when not given) times the noise
        scale. omega, interval: the guidance, in pMF's convention (its README's --cfg-omega,
        --interval-min/max); None: the sampler's. y=None: the null class, as many as
        num_samples or z0 has. cuda_graphs: replay the trajectory from one CUDA graph (None:
        on CUDA devices)."""
        omega = self.omega if omega is None else omega
        interval = self.interval if interval is None else tuple(interval)
        check_pmf_settings(steps, omega, interval)
        net = self.net
        device = next(net.parameters()).device
        if y is None:
            count = num_samples if num_samples is not None else None if z0 is None else len(z0)
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"y=None (the null class) needs num_samples >= 1, or z0, for "
                                 f"the batch size; got {count!r}")
            y = torch.full((count,), net.num_classes, dtype=torch.long, device=device)
        check_labels(y, net.num_classes)
        shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
        if z0 is None:
            z0 = torch.randn(shape, generator=generator, device=y.device)
        elif tuple(z0.shape) != shape:
            raise ValueError(f"z0 must have shape {shape}, got {tuple(z0.shape)}")
        z = self.noise_scale * z0.to(y.device, torch.float32)
        return self.run(y, z, steps, float(omega), interval, cuda_graphs)

    def run(self, y, z, steps, omega, interval, cuda_graphs):
        if cuda_graphs is None:
            cuda_graphs = y.is_cuda
        elif cuda_graphs and not y.is_cuda:
            raise ValueError("cuda_graphs=True needs the labels (and model) on a CUDA device")
        net = self.net
        was_training, checks = net.training, net.check_values
        net.eval()
        net.check_values = False  # checked above: no host sync per evaluation
        try:
            with torch.no_grad():
                if not cuda_graphs:
                    return integrate_pmf(net, y, z, *run_tensors(steps, omega, interval, y.device))
                first = next(net.parameters())
                key = (y.shape[0], steps, omega, interval, first.data_ptr(), first.dtype,
                       torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
                graph = self.graph_cache.get(key, lambda: CapturedRun(partial(
                    captured_pmf, net, *run_tensors(steps, omega, interval, y.device)), y, z))
                return graph(y, z)
        finally:
            net.train(was_training)
            net.check_values = checks


def run_tensors(steps, omega, interval, device):
    """The time grid and the guidance (omega, t_min, t_max) of a run, on the device (made once
    per capture: a replay reads the captured ones)."""
    guidance = [torch.full((1,), v, dtype=torch.float32, device=device)
                for v in (omega, *interval)]
    return PMFTimeGrid.make(steps, device), guidance


def captured_pmf(net, grid, guidance, y, z):
    """``integrate_pmf`` with the grid and guidance tensors the graph reads bound first."""
    return integrate_pmf(net, y, z, grid, guidance)


def check_pmf_settings(steps, omega, interval):
    """The sampler settings alone (no model needed): a command line checks them up front."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    check_guidance(omega, interval)


def check_guidance(omega, interval):
    lo, hi = interval
    if not omega >= 1:
        raise ValueError(f"omega (pMF's guidance scale) must be >= 1 (1: no guidance), got "
                         f"{omega}")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"the guidance interval must satisfy 0 <= t_min <= t_max <= 1 (pMF's "
                         f"time: t = 1 is noise), got ({lo}, {hi})")

