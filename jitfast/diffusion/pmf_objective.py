"""pixel MeanFlow's training objective (Lu et al. 2026), as the official JAX code computes it
(github Lyy-iiis/pMF, branch main, pmf.py: ``pixelMeanFlow.forward``), in pMF's time (t = 0
data, t = 1 noise), with the JVP through jitfast's fused ops.

For images x, labels y and draws (t ≥ r, noise e, guidance scale ω and interval [t_min, t_max],
label drops): z = (1 - t)·x + t·s·e and v_t = (z - x)/clip(t, 0.05, 1). The target is the guided
instantaneous velocity v_g = v_t + (1 - 1/w)(v_c - v_u), from the v-head at ω (v_c, label y) and
at 1 (v_u, the null class), w = ω inside the interval and 1 outside (the v_c of w, also the
JVP's tangent); the flow-matching examples (r = t: the first data_proportion of the batch)
always take ω; dropped labels (the first num_drop examples) become the null class with
v_g = v_t. Then (u, du/dt, v) = JVP of the network along (v_c, 1, 0) in (z, t, r), V = u +
(t - r)·sg(du/dt), and the loss is the batch mean of adaptively weighted per-example sums
Σ(V - v_g)² and Σ(v - v_g)² (each loss/sg((loss + ε)^p)), plus optional perceptual terms on
x̂ = z - t·u for t < perceptual_max_t.

Nothing is computed twice: the official step evaluates the v-head on 3B examples (v_c and v_u at
ω, then v_c again at w), where w = ω for every flow-matching example; here one v-head pass takes
the 2B of the first evaluation and the (B - B·data_proportion) others' w, and the u-head is not
run for it. The JVP pass carries value and tangent through each fused op together, attention's
tangent in a flash-style kernel, and runs the v-head on the trunk's value alone.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from jitfast.diffusion.draws import example_noise, seed_of
from jitfast.network.pmf import U_T_MIN


class PMFDraws(NamedTuple):
    """One step's draws for B examples, each (B,): times t ≥ r, the flow-matching mask fm (r =
    t), the guidance scale omega and interval [t_min, t_max] (0 and 1 where fm), the label-drop
    mask drop (bool); noise (B, C, H, W): standard normal, before the noise scale. fm_count: how
    many examples are flow matching (they come first; fm is True there), known on the host: a
    process's share of a batch holds fewer than its size says (None: as many as the objective
    gives a batch of B)."""
    t: torch.Tensor
    r: torch.Tensor
    fm: torch.Tensor
    noise: torch.Tensor
    omega: torch.Tensor
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop: torch.Tensor
    fm_count: int = None


def adaptive(loss, p, eps):
    """loss/sg((loss + eps)^p): the official adaptive weight."""
    return loss / (loss.detach() + eps) ** p


class PMFObjective(nn.Module):
    """pMF's objective around a ``PMF(..., v_head=True)`` `net`, with the official
    ``pixelMeanFlow`` defaults. ``loss(images, labels, draws)`` -> (loss, parts), parts holding
    the official dict's entries (loss, loss_u, loss_v, aux_loss_lpips, aux_loss_convnext);
    ``draw(batch, seed, step)`` makes a step's draws. `perceptual`: a callable (x̂, x) ->
    (lpips, convnext), each (B,), on NCHW images in [-1, 1], with its feature networks (the
    user's), used where lpips_lambda or convnext_lambda is nonzero."""

    def __init__(self, net, noise_scale=1.0, P_mean=-0.4, P_std=1.0, cfg_max=7.0, cfg_beta=1.0,
                 data_proportion=0.5, class_dropout_prob=0.1, norm_p=1.0, norm_eps=0.01,
                 perceptual=None, lpips_lambda=1.0, convnext_lambda=0.0, perceptual_max_t=1.0):
        super().__init__()
        net.check_v_head()
        if not 0.0 <= data_proportion <= 1.0 or not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"data_proportion and class_dropout_prob must lie in [0, 1], got "
                             f"{data_proportion}, {class_dropout_prob}")
        if noise_scale <= 0 or cfg_max < 0:
            raise ValueError(f"noise_scale must be positive and cfg_max >= 0, got "
                             f"{noise_scale}, {cfg_max}")
        self.net = net
        self.noise_scale, self.P_mean, self.P_std = noise_scale, P_mean, P_std
        self.cfg_max, self.cfg_beta = cfg_max, cfg_beta
        self.data_proportion, self.class_dropout_prob = data_proportion, class_dropout_prob
        self.norm_p, self.norm_eps = norm_p, norm_eps
        self.perceptual = perceptual
        self.lpips_lambda, self.convnext_lambda = lpips_lambda, convnext_lambda
        self.perceptual_max_t = perceptual_max_t
        self.num_classes = net.num_classes

    # --- draws -----------------------------------------------------------------------------

    def flow_matching_examples(self, batch):
        """How many examples (the first ones) take r = t: int(batch·data_proportion)."""
        return int(batch * self.data_proportion)

    def cfg_scale(self, u):
        """The guidance scale of uniforms u: the official power law on [1, 1 + cfg_max]."""
        s_max = torch.tensor(self.cfg_max, dtype=torch.float32, device=u.device)
        if self.cfg_beta == 1.0:
            return torch.exp(u * torch.log1p(s_max))
        log_base = (1.0 - self.cfg_beta) * torch.log1p(s_max)
        return torch.exp(torch.log1p(u * torch.expm1(log_base)) / (1.0 - self.cfg_beta))

    def draw(self, batch, seed, step, first=0, count=None, shape=None, device=None):
        """The draws of examples [first, first + count) of a global batch of `batch` at `step`,
        as the official samplers make them, each a function of (seed, step, example): the
        scalars from one generator seeded by (seed, step) that draws the whole batch (the
        flow-matching and drop masks depend on the batch), the noise of example i from
        seed_of(seed, step, i). shape: an image's (C, H, W), default the network's."""
        count = batch - first if count is None else count
        device = torch.device(device or next(self.net.parameters()).device)
        net = self.net
        shape = shape or (net.in_channels, net.input_size, net.input_size)
        gen = torch.Generator(device).manual_seed(seed_of(seed, step))

        def uniform(low=0.0, high=1.0):
            return torch.rand(batch, device=device, generator=gen) * (high - low) + low

        def logit_normal():
            return torch.sigmoid(torch.randn(batch, device=device, generator=gen) * self.P_std
                                 + self.P_mean)
        t, r = logit_normal(), logit_normal()
        fm = torch.arange(batch, device=device) < self.flow_matching_examples(batch)
        r = torch.where(fm, t, r)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        t_min = torch.where(fm, 0.0, uniform(0.0, 0.5))
        t_max = torch.where(fm, 1.0, uniform(0.5, 1.0))
        omega = self.cfg_scale(uniform())
        num_drop = (uniform() < self.class_dropout_prob).sum()
        drop = torch.arange(batch, device=device) < num_drop
        part = slice(first, first + count)
        noise = example_noise([seed_of(seed, step, i) for i in range(first, first + count)],
                              shape, device)
        fm_count = min(max(self.flow_matching_examples(batch) - first, 0), count)
        return PMFDraws(t[part], r[part], fm[part], noise, omega[part], t_min[part], t_max[part],
                        drop[part], fm_count)

    # --- loss ------------------------------------------------------------------------------

    def passes(self, batch):
        """Examples each network pass of a step takes: the v-head's guidance pass and the JVP
        pass (the official step: 2B + B, then B)."""
        return {"guidance (trunk + v-head)": 2 * batch + batch - self.flow_matching_examples(batch),
                "JVP (trunk and u-head with tangents, v-head)": batch}

    def guidance(self, z, t, v_t, labels, draws):
        """(v_g, v_c) of the official guidance_fn: the guided target and the conditional
        velocity at w (the JVP's tangent), without gradient, in one v-head pass."""
        B = z.shape[0]
        n_fm = self.flow_matching_examples(B) if draws.fm_count is None else draws.fm_count
        null = torch.full_like(labels, self.num_classes)
        inside = (t >= draws.t_min) & (t <= draws.t_max)
        w = torch.where(inside, draws.omega, torch.ones_like(draws.omega))
        rest = slice(n_fm, B)  # flow matching takes w = ω: its v_c is the first evaluation's
        zs = torch.cat([z, z, z[rest]])
        ts = torch.cat([t, t, t[rest]])
        omegas = torch.cat([draws.omega, torch.ones_like(draws.omega), w[rest]])
        ys = torch.cat([labels, null, labels[rest]])
        zero, one = torch.zeros_like(ts), torch.ones_like(ts)
        with torch.no_grad():
            v = self.net.velocities(zs, ts, zero, omegas, zero, one, ys, u=False)
        v_c, v_u, v_w = v[:B], v[B:2 * B], v[2 * B:]
        v_c_w = torch.cat([v_c[:n_fm], v_w])
        shape = (-1, 1, 1, 1)
        v_g_fm = v_t + (1 - 1 / draws.omega).view(shape) * (v_c - v_u)
        v_g = v_t + (1 - 1 / w).view(shape) * (v_c_w - v_u)
        return torch.where(draws.fm.view(shape), v_g_fm, v_g), v_c_w

    def loss(self, images, labels, draws):
        """(loss, parts) for images (B, C, H, W) in [-1, 1], labels (B,) (None: the null class)
        and the step's `draws` (``PMFDraws``)."""
        x = images.float()
        B = x.shape[0]
        if labels is None:
            labels = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        shape = (-1, 1, 1, 1)
        t, r = draws.t.float(), draws.r.float()
        e = draws.noise.float() * self.noise_scale
        z = (1 - t.view(shape)) * x + t.view(shape) * e
        v_t = (z - x) / t.clamp(U_T_MIN, 1.0).view(shape)
        v_g, v_c = self.guidance(z, t, v_t, labels, draws)
        labels = torch.where(draws.drop, torch.full_like(labels, self.num_classes), labels)
        v_g = torch.where(draws.drop.view(shape), v_t, v_g)
        ones = torch.ones_like(t)
        u, du_dt, v = self.net.forward_dual(z, t, t - r, draws.omega, draws.t_min, draws.t_max,
                                            labels, v_c, ones, ones)
        V = u + (t - r).view(shape) * du_dt  # du_dt carries no gradient
        error_u, error_v = (V - v_g).square(), (v - v_g).square()
        loss = (adaptive(error_u.sum((1, 2, 3)), self.norm_p, self.norm_eps)
                + adaptive(error_v.sum((1, 2, 3)), self.norm_p, self.norm_eps))
        lpips = convnext = torch.zeros((), device=x.device)
        if self.perceptual is not None and (self.lpips_lambda or self.convnext_lambda):
            lpips, convnext = self.perceptual(z - t.view(shape) * u, x)
            near = t < self.perceptual_max_t
            lpips, convnext = (torch.where(near, a, torch.zeros_like(a))
                               for a in (lpips, convnext))
            loss = (loss + adaptive(lpips, self.norm_p, self.norm_eps) * self.lpips_lambda
                    + adaptive(convnext, self.norm_p, self.norm_eps) * self.convnext_lambda)
        loss = loss.mean()
        parts = {"loss": loss.detach(), "loss_u": error_u.mean().detach(),
                 "loss_v": error_v.mean().detach(), "aux_loss_lpips": lpips.mean().detach(),
                 "aux_loss_convnext": convnext.mean().detach()}
        return loss, parts

    @property
    def metrics(self):
        """The names of forward's loss and extras: the perceptual terms where they are on."""
        on = self.perceptual is not None and bool(self.lpips_lambda or self.convnext_lambda)
        return ("loss", "loss_u", "loss_v", *(("aux_loss_lpips", "aux_loss_convnext") if on
                                              else ()))

    def forward(self, images, labels, *draws):
        """The training step's call: the draws' fields flat (a CUDA-graphed step copies each
        tensor in); returns (loss, [loss_u, loss_v, ...]) of ``loss``: the extras ``metrics``
        names."""
        loss, parts = self.loss(images, labels, PMFDraws(*draws))
        return loss, torch.stack([parts[name] for name in self.metrics[1:]])

