"""ODE sampling from t = 0 (noise) to t = 1 (image) on a linear grid, as the official JiT does:
Heun steps and a final Euler step (or Euler throughout), classifier-free guidance inside an
interval of t. The state stays float32 whatever the network's dtype.
"""
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


def network_velocity(denoiser, y, z, t, w, guided):
    """The velocity at float32 state z (B, C, H, W), time t (a (1,) float32 tensor).

    Unguided: one conditional pass. Guided: cond and uncond as one batched forward, combined as
    v_u + w·(v_c - v_u).
    """
    out = denoiser.net(*network_inputs(denoiser, y, z, t, guided)).float()
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


def network_step(denoiser, y, z, t, w, guided, dt, v_prev=None, base=None):
    """One network evaluation of the velocity at float32 state z, time t, guidance weight w, and
    the ODE state it leads to: ``ode_update(v, z, dt, v_prev, base)``, t and dt being (1,)
    float32 tensors.

    For a JiT on the Triton kernels with x-prediction, the output head computes both in its
    epilogue (``jitfast.kernels.output_head_step``), guidance included. Tensor-only, so it can be
    captured in a CUDA graph.
    """
    net = denoiser.net
    kernels = head_kernels(net, z.device)
    if kernels is None or denoiser.pred != "x":
        return ode_update(network_velocity(denoiser, y, z, t, w, guided), z, dt, v_prev, base)

    def head(u, weight, bias):
        return kernels.output_head_step(u, weight, bias, z, t, dt, net.patch_size,
                                        denoiser.t_eps, w if guided else None, v_prev, base)
    return net(*network_inputs(denoiser, y, z, t, guided), head=head)


class CapturedStep:
    """``network_step`` for one batch size, guidance mode and kind of evaluation (Heun's second,
    or any other), captured once as a CUDA graph over static input buffers and replayed for every
    evaluation."""

    def __init__(self, denoiser, y, z, guided, heun_second):
        self.y, self.z = y.clone(), z.clone()
        self.t, self.dt = torch.zeros(1, device=z.device), torch.zeros(1, device=z.device)
        self.w = torch.ones((), device=z.device)
        self.heun = (z.clone(), z.clone()) if heun_second else ()  # v_prev, base
        args = (denoiser, self.y, self.z, self.t, self.w, guided, self.dt, *self.heun)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning and lazy init happen before capture
            for _ in range(2):
                network_step(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = network_step(*args)

    def __call__(self, z, y, t, w, dt, *heun):
        for buffer, value in zip((self.z, self.y, *self.heun), (z, y, *heun)):
            buffer.copy_(value)
        for buffer, value in ((self.t, t), (self.w, w), (self.dt, dt)):
            buffer.fill_(value)
        self.graph.replay()
        return tuple(out.clone() for out in self.out)  # the next replay overwrites self.out


def step_function(denoiser, y, cuda_graphs):
    """step(z, t, w, dt, *heun) -> ``network_step``'s (state, v) for python floats t, w (the
    guidance weight) and dt, with heun = (v_prev, base) for Heun's second evaluation; replays
    cached CUDA graphs when asked."""
    if not cuda_graphs:
        def step(z, t, w, dt, *heun):
            t, dt = (torch.full((1,), s, device=z.device) for s in (t, dt))
            return network_step(denoiser, y, z, t, w, w != 1.0, dt, *heun)
        return step
    net = denoiser.net
    first = next(net.parameters())
    cache = denoiser.graph_cache

    def step(z, t, w, dt, *heun):
        # graphs hold raw pointers: recapture if the weights were moved or re-typed
        key = (z.shape[0], w != 1.0, bool(heun), first.data_ptr(), first.dtype)
        if key not in cache:
            cache[key] = CapturedStep(denoiser, y, z, w != 1.0, bool(heun))
        return cache[key](z, y, t, w, dt, *heun)
    return step


def generate(denoiser, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0), z0=None,
             generator=None, cuda_graphs=None):
    """Integrate the sampling ODE for labels y (B,); z0 is the standard-normal start (drawn from
    `generator` when not given), scaled by the denoiser's noise_scale. Returns float32 images.

    cuda_graphs: replay each network evaluation from a CUDA graph captured on first use (cached
    on the denoiser per batch size and guidance mode); None means "on CUDA devices".
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
    timesteps = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    weights = guidance_weights(timesteps, cfg, interval)
    times = timesteps.tolist()
    step = step_function(denoiser, y, cuda_graphs)
    was_training, checks = net.training, getattr(net, "check_values", None)
    net.eval()
    if checks is not None:  # y and the times are checked above: no host sync per evaluation
        net.check_values = False
    try:
        for i in range(steps):
            dt = (timesteps[i + 1] - timesteps[i]).item()
            z_next, v = step(z, times[i], weights[i], dt)
            if method == "heun" and i < steps - 1:  # the last step is always Euler
                z_next, _ = step(z_next, times[i + 1], weights[i + 1], dt, v, z)
            z = z_next
    finally:
        net.train(was_training)
        if checks is not None:
            net.check_values = checks
    return z
