"""The sampler of a checkpoint: its family's sampler (JiT's Denoiser, pMF's PMFSampler) with the
settings its run recorded.

Every command that samples a checkpoint (``python -m jitfast.sample``, ``jitfast.export``, the
experiments) and the training run's own sample grid take their settings from here, so that a
checkpoint samples the same way whoever reads it.
"""
import os
from functools import partial

from jitfast.diffusion.denoiser import Denoiser, default_noise_scale
from jitfast.diffusion.pmf_sampler import PMFSampler
from jitfast.io.checkpoint import model_from_checkpoint, read_checkpoint, training_setting

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


def pmf_recorded(ckpt, input_size):
    """A jitfast pMF run's noise scale and its grid's guidance (omega, interval); None where
    not recorded (the sampler's preset defaults)."""
    recorded = partial(training_setting, ckpt)
    return dict(noise_scale=recorded("noise_scale", None), omega=recorded("sample_cfg", None),
                interval=recorded("sample_interval", None))


# each family's sampler (by its network's ``family``), the settings it takes beside the network,
# and those a checkpoint records: (ckpt, input size) -> settings
SAMPLERS = {"JiT": (Denoiser, ("noise_scale", "t_eps", "pred"),
                    lambda ckpt, size: sampler_settings(ckpt.get("args"), size)),
            "pMF": (PMFSampler, ("noise_scale", "omega", "interval"), pmf_recorded)}


def sampler_for(net, **settings):
    """The sampler of `net`'s family with `settings` (None: the sampler's default); ValueError
    for a setting the family's sampler does not take (another family's) or a bad value."""
    sampler, takes, _ = SAMPLERS[net.family]
    foreign = [name for name, value in settings.items() if value is not None and name not in takes]
    if foreign:
        raise ValueError(f"{' and '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not "
                         f"among {net.family}'s sampler settings ({', '.join(takes)})")
    return sampler(net, **{k: v for k, v in settings.items() if v is not None})


def denoiser_from_checkpoint(ckpt, weights=None, device="cpu", backend="auto", dtype=None,
                             noise_scale=None, t_eps=None):
    """The sampler (eval mode) of the checkpoint `ckpt` (a path, or a dict from
    ``read_checkpoint``): its `weights` on `device` in `dtype` (a torch dtype; None: as stored)
    in its family's sampler with the settings its run recorded (``SAMPLERS``): a JiT's
    Denoiser with its ``sampler_settings``, a pMF's ``PMFSampler`` with the noise scale and
    guidance a jitfast run recorded (its --noise-scale, --sample-cfg, --sample-interval), else
    its preset's. `noise_scale` and `t_eps`, when given, win (t_eps is JiT's alone)."""
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = read_checkpoint(ckpt)
    net = model_from_checkpoint(ckpt, weights, device, backend)
    if dtype is not None:
        net = net.to(dtype)
    settings = SAMPLERS[net.family][2](ckpt, net.input_size)
    given = {k: v for k, v in dict(noise_scale=noise_scale, t_eps=t_eps).items() if v is not None}
    return sampler_for(net, **{**settings, **given}).eval()
