"""The sampler of a checkpoint: its Denoiser settings, and the Denoiser itself.

Every command that samples a checkpoint (``python -m jitfast.sample``, ``jitfast.export``, the
experiments) and the training run's own sample grid take their settings from here, so that a
checkpoint samples the same way whoever reads it.
"""
import os
from functools import partial

from jitfast.diffusion.denoiser import Denoiser, default_noise_scale
from jitfast.diffusion.pmf_sampler import PMFSampler
from jitfast.io.checkpoint import model_from_checkpoint, read_checkpoint, training_setting
from jitfast.network.pmf import PMF

T_EPS, PRED = 0.05, "x"  # the official t_eps; JiT's prediction target


def sampler_settings(training_args, input_size, noise_scale=None, t_eps=None):
    """The Denoiser keywords (noise_scale, t_eps, pred) of a network trained with
    `training_args` (a checkpoint's "args": an official argparse.Namespace, jitfast's dict, or
    None) at `input_size` px. What the args do not record gets the default: the noise std of
    ``default_noise_scale``, t_eps 0.05, x-prediction. `noise_scale` and `t_eps`, when not None
    (a command line's), win over the args."""
    recorded = partial(training_setting, {"args": training_args})
    return dict(
        noise_scale=recorded("noise_scale", default_noise_scale(input_size))
        if noise_scale is None else noise_scale,
        t_eps=recorded("t_eps", T_EPS) if t_eps is None else t_eps,
        pred=recorded("pred", PRED))


def denoiser_from_checkpoint(ckpt, weights=None, device="cpu", backend="auto", dtype=None,
                             noise_scale=None, t_eps=None):
    """A Denoiser (eval mode) that samples the JiT checkpoint `ckpt` (a path, or a dict from
    ``read_checkpoint``): its `weights` on `device` in `dtype` (a torch dtype; None: as stored),
    with its ``sampler_settings`` (`noise_scale` and `t_eps`, when given, win); for pMF weights,
    a ``PMFSampler`` with the noise scale and guidance (omega, interval) a jitfast run recorded
    (its --noise-scale, --sample-cfg, --sample-interval), else its preset's (`noise_scale`, when
    given, wins; t_eps must be None: pMF has none)."""
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = read_checkpoint(ckpt)
    net = model_from_checkpoint(ckpt, weights, device, backend)
    if dtype is not None:
        net = net.to(dtype)
    if isinstance(net, PMF):
        if t_eps is not None:
            raise ValueError("t_eps is JiT's clamp of 1 - t; a pMF model has its own fixed "
                             "one (u = (z - x̂)/max(t, 0.05)): drop it")
        recorded = partial(training_setting, ckpt)  # a jitfast run's: its grid's guidance
        return PMFSampler(net, recorded("noise_scale", None) if noise_scale is None
                          else noise_scale, recorded("sample_cfg", None),
                          recorded("sample_interval", None)).eval()
    settings = sampler_settings(ckpt.get("args"), net.input_size, noise_scale, t_eps)
    return Denoiser(net, **settings).eval()
