"""ODE sampling from t = 0 (noise) to t = 1 (image) on a linear grid, as the official JiT does:
Heun steps and a final Euler step (or Euler throughout), classifier-free guidance inside an
interval of t. The state stays float32 whatever the network's dtype.
"""
import torch

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


def network_velocity(denoiser, y, z, t, w, guided):
    """The velocity at float32 state z (B, C, H, W), time t (a (1,) float32 tensor).

    Unguided: one conditional pass. Guided: cond and uncond as one batched forward, combined as
    v_u + w·(v_c - v_u). Tensor-only, so it can be captured in a CUDA graph.
    """
    net = denoiser.net
    dtype = next(net.parameters()).dtype
    if not guided:
        t_vec = t.expand(z.shape[0])
        return denoiser.velocity(net(z.to(dtype), t_vec, y).float(), z, t_vec)
    z2 = torch.cat([z, z])
    t_vec = t.expand(z2.shape[0])
    y2 = torch.cat([y, torch.full_like(y, denoiser.num_classes)])
    v_cond, v_uncond = denoiser.velocity(net(z2.to(dtype), t_vec, y2).float(), z2, t_vec).chunk(2)
    return v_uncond + w * (v_cond - v_uncond)


class CapturedVelocity:
    """``network_velocity`` for one batch size and guidance mode, captured once as a CUDA graph
    over static input buffers and replayed for every evaluation."""

    def __init__(self, denoiser, z, y, guided):
        self.z, self.y = z.clone(), y.clone()
        self.t = torch.zeros(1, device=z.device)
        self.w = torch.ones((), device=z.device)
        args = (denoiser, self.y, self.z, self.t, self.w, guided)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning and lazy init happen before capture
            for _ in range(2):
                network_velocity(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = network_velocity(*args)

    def __call__(self, z, y, t, w):
        self.z.copy_(z)
        self.y.copy_(y)
        self.t.fill_(t)
        self.w.fill_(w)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites self.out


def velocity_function(denoiser, y, cuda_graphs):
    """v(z, t, w) for python floats t and w; replays cached CUDA graphs when asked."""
    if not cuda_graphs:
        def velocity(z, t, w):
            t = torch.full((1,), t, device=z.device)
            return network_velocity(denoiser, y, z, t, w, w != 1.0)
        return velocity
    net = denoiser.net
    first = next(net.parameters())
    cache = denoiser.graph_cache

    def velocity(z, t, w):
        # graphs hold raw pointers: recapture if the weights were moved or re-typed
        key = (z.shape[0], w != 1.0, first.data_ptr(), first.dtype)
        if key not in cache:
            cache[key] = CapturedVelocity(denoiser, z, y, w != 1.0)
        return cache[key](z, y, t, w)
    return velocity


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
    velocity = velocity_function(denoiser, y, cuda_graphs)
    was_training = net.training
    net.eval()
    try:
        for i in range(steps):
            t, t_next, dt = times[i], times[i + 1], (timesteps[i + 1] - timesteps[i]).item()
            v = velocity(z, t, weights[i])
            if method == "heun" and i < steps - 1:  # the last step is always Euler
                v_next = velocity(z + dt * v, t_next, weights[i + 1])
                v = 0.5 * (v + v_next)
            z = z + dt * v
    finally:
        net.train(was_training)
    return z
