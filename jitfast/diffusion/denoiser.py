"""The flow-matching objective: z_t = t·x + (1-t)·e, t = 1 clean, velocity v = x - e.

The network output is read as one prediction target (x, e or v) and the loss is an MSE in one
loss space (x, e or v). Conversions go through the velocity, with the divisions by 1-t (from x)
and by t (from e) clamped at t_eps:
    v from x: (x - z)/max(1-t, t_eps)        v from e: (z - e)/max(t, t_eps)
    x from v: z + (1-t)·v                    e from v: z - t·v
"""
import torch
import torch.nn as nn

from jitfast.diffusion.sampling import GraphCache, check_settings, generate, invert
from jitfast.network.backend import head_kernels

SPACES = ("x", "e", "v")


def default_noise_scale(input_size):
    """The noise std where nothing records one: 1.0, and 2.0 from 512 px (the official README's
    setting for 512 px)."""
    return 2.0 if input_size >= 512 else 1.0


def convert(u, src, dst, z, t, t_eps):
    """Read `u` as a quantity of space `src` at state z, time t (broadcastable); express it in
    `dst`."""
    if src == dst:
        return u
    if src == "x":
        v = (u - z) / (1 - t).clamp_min(t_eps)
    elif src == "e":
        v = (z - u) / t.clamp_min(t_eps)
    else:
        v = u
    if dst == "v":
        return v
    return z + (1 - t) * v if dst == "x" else z - t * v


class Denoiser(nn.Module):
    """A JiT (``net``) plus the training objective and the sampler.

    pred / loss: the prediction target and loss space, each "x", "e" or "v" (JiT: x-pred, v-loss).
    Training times t ~ sigmoid(N(P_mean, P_std²)); noise e = noise_scale · N(0, I); labels are
    replaced by the null class with probability label_drop_prob in training mode.
    The state dict carries the network under the prefix ``net.``, as official checkpoints do.
    For a JiT on the Triton kernels, JiT's loss (x-pred, v-loss) and the sampler's velocity and
    state update are computed in the output head's epilogue (see ``jitfast.kernels``).
    max_graphs: how many of the sampler's CUDA graphs (one per batch size, settings and weights)
    to keep, the most recently used; the attribute of that name changes it later.
    """

    def __init__(self, net, pred="x", loss="v", P_mean=-0.8, P_std=0.8, noise_scale=1.0,
                 t_eps=0.05, label_drop_prob=0.1, max_graphs=8):
        super().__init__()
        for name, value in (("pred", pred), ("loss", loss)):
            if value not in SPACES:
                raise ValueError(f"{name} must be one of {SPACES}, got {value!r}")
        if not 0.0 <= label_drop_prob < 1.0:
            raise ValueError(f"label_drop_prob must lie in [0, 1), got {label_drop_prob}")
        if noise_scale <= 0 or t_eps <= 0:
            raise ValueError(f"noise_scale and t_eps must be positive, got {noise_scale}, {t_eps}")
        self.net = net
        self.pred, self.loss_space = pred, loss
        self.P_mean, self.P_std = P_mean, P_std
        self.noise_scale, self.t_eps = noise_scale, t_eps
        self.label_drop_prob = label_drop_prob
        self.num_classes = net.num_classes
        self.graph_cache = GraphCache(max_graphs)  # see jitfast.diffusion.sampling.trajectory

    def around(self, net):
        """A Denoiser with this one's objective and sampler settings around another network (the
        same architecture: a copy in another dtype, of other weights)."""
        return Denoiser(net, self.pred, self.loss_space, self.P_mean, self.P_std,
                        self.noise_scale, self.t_eps, self.label_drop_prob, self.max_graphs)

    @property
    def max_graphs(self):
        return self.graph_cache.size

    @max_graphs.setter
    def max_graphs(self, size):
        self.graph_cache.size = size

    def free_graphs(self):
        """Drop every cached CUDA graph of the sampler, and hand their memory back to the device
        at once: torch frees a graph's memory pool when the graph is released, but its allocator
        keeps the blocks until torch.cuda.empty_cache() (or an allocation that needs them)."""
        self.graph_cache.clear()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def sample_t(self, n, device=None, generator=None):
        z = torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean
        return torch.sigmoid(z)

    def drop_labels(self, y, generator=None):
        drop = torch.rand(y.shape[0], device=y.device, generator=generator) < self.label_drop_prob
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def loss(self, x, y=None, t=None, noise=None):
        """MSE in the loss space for clean images x (B, C, H, W) in [-1, 1] and labels y (B,);
        y None: the null class for every image (unconditional), as in ``JiT.forward``.

        t (B,) and noise (a standard-normal draw shaped like x) may be given for reproducibility;
        otherwise they are sampled. Returns a scalar.
        """
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a floating (B, C, H, W) image batch, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        B = x.shape[0]
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        if t is None:
            t = self.sample_t(B, device=x.device)
        elif tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x)
        elif noise.shape != x.shape:
            raise ValueError(f"noise must have the images' shape {tuple(x.shape)}, "
                             f"got {tuple(noise.shape)}")
        if self.training and self.label_drop_prob > 0:
            y = self.drop_labels(y)
        kernels = head_kernels(self.net, x.device)
        if kernels is not None and (self.pred, self.loss_space) == ("x", "v"):
            # z = t·x + (1 - t)·e formed in the patch embedding's gather, v̂ - v = (x̂ - x)/
            # max(1 - t, t_eps) in the head's epilogue: neither z nor x̂ reaches memory
            return self.net(x, t, y, head=lambda u, weight, bias: kernels.output_head_v_loss(
                u, weight, bias, x, t, self.net.patch_size, self.t_eps), noise=noise,
                noise_scale=self.noise_scale)
        t_b = t.view(-1, 1, 1, 1).to(x.dtype)
        e = noise * self.noise_scale
        z = t_b * x + (1 - t_b) * e
        truth = {"x": x, "e": e, "v": x - e}[self.pred]
        out = self.net(z, t, y)
        target = convert(truth, self.pred, self.loss_space, z, t_b, self.t_eps)
        estimate = convert(out.float(), self.pred, self.loss_space, z, t_b, self.t_eps)
        return (estimate - target).pow(2).mean()

    metrics = ("loss",)  # what forward returns: the loss alone

    def forward(self, x, y=None, t=None, noise=None):
        return self.loss(x, y, t, noise)

    def velocity(self, out, z, t):
        """The velocity implied by a network output at state z (float32), times t (B,)."""
        return convert(out, self.pred, "v", z, t.view(-1, 1, 1, 1), self.t_eps)

    # a sampling run's settings unless given (python -m jitfast.sample): the official sampler's
    RUN_DEFAULTS = dict(steps=50, method="heun", schedule="linear", interval=(0.1, 1.0))
    default_guidance = None  # the command's own default applies

    def package_settings(self):
        """The sampler settings an exported package records (``jitfast.export``)."""
        return dict(noise_scale=float(self.noise_scale), t_eps=float(self.t_eps), pred=self.pred)

    def run_options(self, steps=None, method=None, schedule=None, interval=None):
        """{steps, method, schedule, interval, t_eps} of a sampling run: those given, the
        official sampler's for the rest (``sampler_run`` takes them; pMF's sampler has its own)."""
        given = dict(steps=steps, method=method, schedule=schedule, interval=interval)
        options = {**self.RUN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        return {**options, "interval": tuple(options["interval"]), "t_eps": self.t_eps}

    def check_run(self, options, cfg):
        """Raise ValueError for run options (``run_options``) and guidance this sampler refuses."""
        check_settings(options["steps"], options["method"], cfg, options["interval"],
                       options["schedule"])

    def sampler_run(self, y, options, cfg, z0, cuda_graphs=None):
        """``generate`` with a run's options."""
        return self.generate(y, options["steps"], options["method"], cfg, options["interval"],
                             z0=z0, cuda_graphs=cuda_graphs, schedule=options["schedule"])

    @torch.no_grad()
    def generate(self, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0), z0=None,
                 generator=None, cuda_graphs=None, schedule="linear", num_samples=None):
        """Sample images for labels y by integrating the ODE from t = 0 to 1; see
        ``jitfast.diffusion.sampling.generate`` (the methods and schedules). Returns float32 images
        (B, C, H, W), unclipped. y=None samples unconditionally (the null class, cfg 1; the
        only way for a model trained without classes, num_classes 0): num_samples images, or as
        many as z0 has."""
        return generate(self, y, steps, method, cfg, interval, z0, generator, cuda_graphs,
                        schedule, num_samples)

    @torch.no_grad()
    def invert(self, images, y, steps=50, method="heun", cfg=1.0, interval=(0.0, 1.0),
               schedule="linear", cuda_graphs=None):
        """The standard-normal start whose trajectory ends at `images` (the ODE integrated from
        t = 1 back to 0); see ``jitfast.diffusion.sampling.invert``. y=None: the null class."""
        return invert(self, images, y, steps, method, cfg, interval, schedule, cuda_graphs)
