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


def guided_velocity(denoiser, y):
    """v(z, t, w): the guided velocity at float32 state z, grid time t, guidance weight w.

    Where w == 1 only the conditional pass runs; otherwise cond and uncond run as one batched
    forward and combine as v_u + w·(v_c - v_u).
    """
    net = denoiser.net
    dtype = next(net.parameters()).dtype
    y_both = torch.cat([y, torch.full_like(y, denoiser.num_classes)])

    def velocity(z, t, w):
        if w == 1.0:
            t_vec = torch.full((z.shape[0],), t, device=z.device)
            return denoiser.velocity(net(z.to(dtype), t_vec, y).float(), z, t_vec)
        z2 = torch.cat([z, z])
        t_vec = torch.full((z2.shape[0],), t, device=z.device)
        v_cond, v_uncond = denoiser.velocity(net(z2.to(dtype), t_vec, y_both).float(), z2,
                                             t_vec).chunk(2)
        return v_uncond + w * (v_cond - v_uncond)

    return velocity


def generate(denoiser, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0), z0=None,
             generator=None):
    """Integrate the sampling ODE for labels y (B,); z0 is the standard-normal start (drawn from
    `generator` when not given), scaled by the denoiser's noise_scale. Returns float32 images."""
    check_sampling_args(denoiser, y, steps, method, cfg, interval, z0)
    net = denoiser.net
    shape = (y.shape[0], net.in_channels, net.input_size, net.input_size)
    if z0 is None:
        z0 = torch.randn(shape, generator=generator, device=y.device)
    z = denoiser.noise_scale * z0.to(y.device, torch.float32)
    timesteps = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    weights = guidance_weights(timesteps, cfg, interval)
    times = timesteps.tolist()
    velocity = guided_velocity(denoiser, y)
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
