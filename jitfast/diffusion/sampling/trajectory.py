"""Sampling runs: the time grid of a method, the whole trajectory (eager, or captured as one
CUDA graph and replayed), from noise to images (generate) or back (invert)."""
from collections import OrderedDict

import torch

from jitfast.diffusion.sampling.multistep import (EXPONENTIAL_METHODS, MultistepTimeGrid,
                                                  integrate_multistep)
from jitfast.diffusion.sampling.official import TimeGrid, integrate_official
from jitfast.diffusion.sampling.schedules import SCHEDULES
from jitfast.network.alignment import padded_once
from jitfast.util.cuda_graphs import CapturedRun

OFFICIAL_METHODS = ("heun", "euler")
METHODS = OFFICIAL_METHODS + tuple(EXPONENTIAL_METHODS)


def order(method):
    """The steps a method needs to reach its order (its multistep history's length)."""
    return EXPONENTIAL_METHODS[method][0] if method in EXPONENTIAL_METHODS else 1


def unconditional_labels(denoiser, y, cfg, count):
    """y, or for y=None the null class (unconditional samples, the only kind a model with
    num_classes = 0 makes) for `count` examples on the network's device. Guidance needs classes:
    cfg must be 1 for an unconditional model, and for y=None."""
    if cfg != 1 and denoiser.num_classes == 0:
        raise ValueError(f"the model is unconditional (num_classes 0: trained without classes), "
                         f"so there is no class for guidance to amplify: use cfg=1, not {cfg:g}")
    if y is not None:
        return y
    if cfg != 1:
        raise ValueError(f"y=None samples the null class (unconditional), where guidance "
                         f"changes nothing: use cfg=1, not {cfg:g}, or give class labels y")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"y=None (unconditional) needs num_samples >= 1, or z0, for the batch "
                         f"size; got {count!r}")
    device = next(denoiser.net.parameters()).device
    return torch.full((count,), denoiser.num_classes, dtype=torch.long, device=device)


def check_labels(y, num_classes):
    """Raise a ValueError unless y is a 1-D integer tensor of labels in [0, num_classes]."""
    if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of class labels, got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    if y.numel() and not bool(((y >= 0) & (y <= num_classes)).all()):
        if num_classes == 0:
            raise ValueError("the model is unconditional (num_classes 0): its one label is 0, "
                             "the null class; sample it with y=None")
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}] (or {num_classes}, "
                         f"the null class), got [{y.min().item()}, {y.max().item()}]")


def check_sampling_args(denoiser, y, steps, method, cfg, interval, schedule, z0, name="z0"):
    check_labels(y, denoiser.num_classes)
    check_settings(steps, method, cfg, interval, schedule)
    net = denoiser.net
    shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
    if z0 is not None and tuple(z0.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(z0.shape)}")


def check_settings(steps, method, cfg, interval, schedule):
    """The sampler settings alone (no model needed): a command line checks them up front."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < order(method):
        raise ValueError(f"{method} is a {order(method)}-step method: it needs steps >= "
                         f"{order(method)}, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if method in OFFICIAL_METHODS and schedule != "linear":
        raise ValueError(f"{method} runs the official linear grid; the {schedule!r} schedule is "
                         f"for the exponential methods {tuple(EXPONENTIAL_METHODS)}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")


def make_time_grid(denoiser, steps, method, cfg, interval, schedule, device, reverse=False):
    if method in OFFICIAL_METHODS:
        return TimeGrid.make(steps, cfg, interval, device, reverse)
    return MultistepTimeGrid.make(method, steps, schedule, cfg, interval, denoiser, device,
                                  reverse)


def integrate(denoiser, y, z, time_grid, method):
    """The ODE from float32 state z over the time grid, tensor ops only: the eager sampler runs
    it and a CUDA graph captures it whole. The network's SwiGLU weights are padded once for the
    whole trajectory (``padded_once``)."""
    with padded_once(denoiser.net):
        if method in OFFICIAL_METHODS:
            return integrate_official(denoiser, y, z, time_grid, method)
        return integrate_multistep(denoiser, y, z, time_grid)


class CapturedTrajectory(CapturedRun):
    """``integrate`` for one batch size, time grid and method, captured as one CUDA graph over
    static label and state buffers (``jitfast.util.cuda_graphs.CapturedRun``), and replayed for
    every run with those settings."""

    def __init__(self, denoiser, y, z, time_grid, method):
        self.time_grid = time_grid  # the graph reads its tensors
        super().__init__(lambda y, z: integrate(denoiser, y, z, time_grid, method), y, z)


class GraphCache:
    """The sampler's captured trajectories by their settings, at most `size` of them: a capture
    beyond that first drops the least recently used. A dropped trajectory releases its CUDA graph,
    and torch frees the graph's private memory pool with it: the allocator hands the pool's
    blocks back to the device when an allocation would otherwise fail, or at
    torch.cuda.empty_cache()."""

    def __init__(self, size=8):
        self.entries = OrderedDict()  # least recently used first
        self.size = size

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, size):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"the CUDA-graph cache needs a size >= 1, got {size!r}")
        self._size = size
        self.trim(size)

    def __len__(self):
        return len(self.entries)

    def get(self, key, make):
        """The entry of key, made by make() on a miss, after the eviction that makes room for it
        (so that the new capture can reuse the evicted graph's memory)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        self.trim(self.size - 1)
        self.entries[key] = entry = make()
        return entry

    def trim(self, size):
        """Drop the least recently used entries beyond `size`."""
        while len(self.entries) > size:
            self.entries.popitem(last=False)

    def clear(self):
        self.entries.clear()


def generate(denoiser, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0), z0=None,
             generator=None, cuda_graphs=None, schedule="linear", num_samples=None):
    """Integrate the sampling ODE for labels y (B,); z0 is the standard-normal start (drawn from
    `generator` when not given), scaled by the denoiser's noise_scale. Returns float32 images.
    y=None: unconditional samples (the null class; cfg 1), as many as num_samples or z0 has.

    method: "heun" and "euler" are the official sampler (``steps`` Heun steps with a last Euler
    step: 2·steps - 1 evaluations); the exponential methods
    (``jitfast.diffusion.sampling.multistep``) take one evaluation per step on the time grid of
    ``schedule``. cuda_graphs: replay the whole trajectory from one CUDA graph, captured on first
    use and cached on the denoiser per batch size, steps, method, guidance and weights (the
    ``Denoiser.max_graphs`` most recently used; ``Denoiser.free_graphs`` drops them); None means
    "on CUDA devices".
    """
    if num_samples is None and z0 is not None:
        num_samples = len(z0)
    y = unconditional_labels(denoiser, y, cfg, num_samples)
    check_sampling_args(denoiser, y, steps, method, cfg, interval, schedule, z0)
    net = denoiser.net
    if z0 is None:
        shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
        z0 = torch.randn(shape, generator=generator, device=y.device)
    z = denoiser.noise_scale * z0.to(y.device, torch.float32)
    settings = (steps, method, float(cfg), tuple(interval), schedule, False)
    return run_trajectory(denoiser, y, z, settings, cuda_graphs)


def invert(denoiser, images, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0),
           schedule="linear", cuda_graphs=None):
    """The start z0 (standard-normal scale) whose trajectory ends at `images`: the same ODE and
    time grid as ``generate``, integrated from t = 1 back to t = 0. The clamp makes λ(1) finite, so
    the first step evaluates the network at t = 1 itself, in each method's own form (for the
    exponential methods, an exact exponential step in λ). y=None: the null class (cfg 1)."""
    y = unconditional_labels(denoiser, y, cfg, len(images))
    check_sampling_args(denoiser, y, steps, method, cfg, interval, schedule, images, "images")
    z = images.to(y.device, torch.float32)
    settings = (steps, method, float(cfg), tuple(interval), schedule, True)
    return run_trajectory(denoiser, y, z, settings, cuda_graphs) / denoiser.noise_scale


def run_trajectory(denoiser, y, z, settings, cuda_graphs):
    """The trajectory of settings (steps, method, cfg, interval, schedule, reverse) from state z,
    eagerly or from the denoiser's cached CUDA graph for them."""
    if cuda_graphs is None:
        cuda_graphs = y.is_cuda
    elif cuda_graphs and not y.is_cuda:
        raise ValueError("cuda_graphs=True needs the labels (and model) on a CUDA device")
    steps, method, cfg, interval, schedule, reverse = settings

    def time_grid():
        return make_time_grid(denoiser, steps, method, cfg, interval, schedule, y.device, reverse)

    net = denoiser.net
    was_training, checks = net.training, getattr(net, "check_values", None)
    net.eval()
    if checks is not None:  # y and the times are checked above: no host sync per evaluation
        net.check_values = False
    try:
        if not cuda_graphs:
            return integrate(denoiser, y, z, time_grid(), method)
        first = next(net.parameters())
        # graphs hold raw pointers: recapture if the weights were moved or re-typed
        key = (y.shape[0], *settings, first.data_ptr(), first.dtype,
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graph = denoiser.graph_cache.get(
            key, lambda: CapturedTrajectory(denoiser, y, z, time_grid(), method))
        return graph(y, z)
    finally:
        net.train(was_training)
        if checks is not None:
            net.check_values = checks
