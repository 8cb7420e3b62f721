"""ODE sampling from t = 0 (noise) to t = 1 (image) on a linear grid, as the official JiT does:
Heun steps and a final Euler step (or Euler throughout), classifier-free guidance inside an
interval of t. The state stays float32 whatever the network's dtype.
"""
from typing import NamedTuple

import torch

from jitfast.backend import head_kernels

METHODS = ("heun", "euler")


def guidance_weights(timesteps, cfg, interval):
    """w(t) per grid time: cfg where t < hi and (lo == 0 or t > lo), else 1 (float32 compare)."""
    lo, hi = interval
    inside = (timesteps < hi) & ((lo == 0) | (timesteps > lo))
    return torch.where(inside, cfg, 1.0).tolist()


def check_sampling_args(denoiser, y, steps, method, cfg, interval, z0):
    if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"y must be a 1-D integer tensor of class labels, got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    if y.numel() and not bool(((y >= 0) & (y <= denoiser.num_classes)).all()):
        raise ValueError(f"class labels must lie in [0, {denoiser.num_classes - 1}] (or "
                         f"{denoiser.num_classes}, the null class), got "
                         f"[{y.min().item()}, {y.max().item()}]")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    net = denoiser.net
    shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
    if z0 is not None and tuple(z0.shape) != shape:
        raise ValueError(f"z0 must have shape {shape}, got {tuple(z0.shape)}")


def network_inputs(denoiser, y, z, t, guided):
    """The network's (z, t, y) for an evaluation at float32 state z, time t (a (1,) tensor): the
    batch, or when guided the conditional batch then its unconditional (null-class) copy."""
    if guided:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, denoiser.num_classes)])
    return z.to(next(denoiser.net.parameters()).dtype), t.expand(z.shape[0]), y


def network_velocity(denoiser, y, z, t, w, guided, cond=None):
    """The velocity at float32 state z (B, C, H, W), time t (a (1,) float32 tensor).

    Unguided: one conditional pass. Guided: cond and uncond as one batched forward, combined as
    v_u + w·(v_c - v_u).
    """
    extra = {} if cond is None else {"cond": cond}
    out = denoiser.net(*network_inputs(denoiser, y, z, t, guided), **extra).float()
    t = t.expand(z.shape[0])
    if not guided:
        return denoiser.velocity(out, z, t)
    v_cond, v_uncond = (denoiser.velocity(half, z, t) for half in out.chunk(2))
    return v_uncond + w * (v_cond - v_uncond)


def ode_update(v, z, dt, v_prev=None, base=None):
    """(state, v) after evaluating the velocity v at state z: the Euler step z + dt·v; or for
    Heun's second evaluation, at z = base + dt·v_prev, the step base + dt·(v_prev + v)/2 (whose v
    nothing needs: the fused kernel leaves it empty)."""
    if v_prev is None:
        return z + dt * v, v
    return base + dt * (0.5 * (v_prev + v)), v


def network_step(denoiser, y, z, t, w, guided, dt, v_prev=None, base=None, cond=None):
    """One network evaluation of the velocity at float32 state z, time t, guidance weight w, and
    the ODE state it leads to: ``ode_update(v, z, dt, v_prev, base)``, t, w and dt being (1,)
    float32 tensors; cond, the network's precomputed conditioning rows (``JiT.conditioning``).

    For a JiT on the Triton kernels with x-prediction, the output head computes both in its
    epilogue (``jitfast.kernels.output_head_step``), guidance included. Tensor-only, so it can be
    captured in a CUDA graph.
    """
    net = denoiser.net
    kernels = head_kernels(net, z.device)
    if kernels is None or denoiser.pred != "x":
        v = network_velocity(denoiser, y, z, t, w, guided, cond)
        return ode_update(v, z, dt, v_prev, base)

    def head(u, weight, bias):
        return kernels.output_head_step(u, weight, bias, z, t, dt, net.patch_size,
                                        denoiser.t_eps, w if guided else None, v_prev, base)
    return net(*network_inputs(denoiser, y, z, t, guided), head=head, cond=cond)


class Grid(NamedTuple):
    """A run's linear time grid on the device: times t (steps + 1,) float32 from 0 to 1, steps
    dt (steps,), guidance weights w (steps + 1,) and, on the host, where guidance is on."""
    t: torch.Tensor
    dt: torch.Tensor
    w: torch.Tensor
    guided: tuple

    @classmethod
    def make(cls, steps, cfg, interval, device):
        timesteps = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
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


CONDITIONING_BUDGET = 256 * 2**20  # bytes of conditioning precomputed for a whole trajectory


def trajectory_conditioning(denoiser, y, grid):
    """rows(k, guided): the network's conditioning of the evaluation at grid time k, taken from
    one batch computed for every (grid time, label) pair of the run — the labels y, then when
    guidance is on anywhere the null class for each example. rows(...) is None throughout (the
    network computes its own) when the network has no ``conditioning``, when its weights are
    FSDP shards (gathered only inside its forward), or when the batch would take more than
    CONDITIONING_BUDGET (large batches, whose per-evaluation matmuls run efficiently)."""
    net = denoiser.net
    B = y.shape[0]
    labels = torch.cat([y, torch.full_like(y, denoiser.num_classes)]) if any(grid.guided) else y
    times = len(grid.dt)  # the last grid time (t = 1) is never evaluated
    if not hasattr(net, "conditioning") or sharded(net):
        return lambda k, guided: None
    width = net.hidden_size * (1 + 6 * len(net.blocks) + 2)
    if times * len(labels) * width * next(net.parameters()).element_size() > CONDITIONING_BUDGET:
        return lambda k, guided: None
    cond = net.conditioning(grid.t[:times].repeat_interleave(len(labels)), labels.repeat(times))
    return lambda k, guided: cond.rows(slice(k * len(labels), k * len(labels) + B * (1 + guided)))


def sharded(module):
    """Whether the module's weights are distributed tensors (FSDP2 shards)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def integrate(denoiser, y, z, grid, method):
    """The ODE from float32 state z over the grid, tensor ops only: the eager sampler runs it and
    a CUDA graph captures it whole."""
    rows = trajectory_conditioning(denoiser, y, grid)
    last = len(grid.dt) - 1
    v = base = None
    for i, k, second in grid.evaluations(method):
        guided = grid.guided[k]
        state, v_new = network_step(denoiser, y, z, grid.t[k:k + 1], grid.w[k:k + 1], guided,
                                    grid.dt[i:i + 1], *((v, base) if second else ()),
                                    cond=rows(k, guided))
        if not second and method == "heun" and i < last:  # Heun's second evaluation follows
            v, base = v_new, z
        z = state
    return z


def warm_up(denoiser, y, z, grid, method):
    """One evaluation of each kind the run makes (guided or not, Heun's second or not) on the
    conditioning rows it will use: every kernel and shape of the trajectory, once."""
    rows = trajectory_conditioning(denoiser, y, grid)
    kinds = {(grid.guided[k], second): (i, k) for i, k, second in grid.evaluations(method)}
    for (guided, second), (i, k) in kinds.items():
        network_step(denoiser, y, z, grid.t[k:k + 1], grid.w[k:k + 1], guided, grid.dt[i:i + 1],
                     *((z, z) if second else ()), cond=rows(k, guided))


class CapturedTrajectory:
    """``integrate`` for one batch size, grid and method, captured as one CUDA graph over static
    label and state buffers, and replayed for every run with those settings.

    Under autocast, the casts of the weights are captured as kernels (autocast's cast cache is
    off for the warm-up and the capture): a cached copy would be freed when the caller's autocast
    region ends, and would miss the new values of weights changed in place (EMA swaps)."""

    def __init__(self, denoiser, y, z, grid, method):
        self.y, self.z, self.grid = y.clone(), z.clone(), grid  # the graph reads the grid
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), no_cast_cache():  # autotuning, lazy init before capture
            for _ in range(2):
                warm_up(denoiser, self.y, self.z, grid, method)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), no_cast_cache():
            self.out = integrate(denoiser, self.y, self.z, grid, method)

    def __call__(self, y, z):
        self.y.copy_(y)
        self.z.copy_(z)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites self.out


def no_cast_cache():
    """CUDA autocast as the caller set it (on or off, its dtype), without the weight-cast cache."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                          enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)


def generate(denoiser, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0), z0=None,
             generator=None, cuda_graphs=None):
    """Integrate the sampling ODE for labels y (B,); z0 is the standard-normal start (drawn from
    `generator` when not given), scaled by the denoiser's noise_scale. Returns float32 images.

    cuda_graphs: replay the whole trajectory from one CUDA graph, captured on first use and
    cached on the denoiser per batch size, steps, method, guidance and weights; None means "on
    CUDA devices".
    """
    check_sampling_args(denoiser, y, steps, method, cfg, interval, z0)
    if cuda_graphs is None:
        cuda_graphs = y.is_cuda
    elif cuda_graphs and not y.is_cuda:
        raise ValueError("cuda_graphs=True needs the labels (and model) on a CUDA device")
    net = denoiser.net
    shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
    if z0 is None:
        z0 = torch.randn(shape, generator=generator, device=y.device)
    z = denoiser.noise_scale * z0.to(y.device, torch.float32)
    was_training, checks = net.training, getattr(net, "check_values", None)
    net.eval()
    if checks is not None:  # y and the times are checked above: no host sync per evaluation
        net.check_values = False
    try:
        if not cuda_graphs:
            return integrate(denoiser, y, z, Grid.make(steps, cfg, interval, y.device), method)
        first = next(net.parameters())
        # graphs hold raw pointers: recapture if the weights were moved or re-typed
        key = (y.shape[0], steps, method, float(cfg), tuple(interval), first.data_ptr(),
               first.dtype, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in denoiser.graph_cache:
            grid = Grid.make(steps, cfg, interval, y.device)
            denoiser.graph_cache[key] = CapturedTrajectory(denoiser, y, z, grid, method)
        return denoiser.graph_cache[key](y, z)
    finally:
        net.train(was_training)
        if checks is not None:
            net.check_values = checks
