"""The model families ``python -m jitfast.train`` trains, each one object: its presets, the
defaults of its recipe, how it builds its objective around a network, the inputs of a step
(the draws made per (seed, step, example)), and the sample grid. The trainer asks the family
of its --model (``family_of``) instead of branching on it.

    JiT  the Denoiser (x-prediction, v-loss) around a JiT; draws t, noise, label drops;
         the grid: Denoiser.generate with the run's sampler
    pMF  PMFObjective around a PMF with its v-head; draws PMFDraws; the grid: PMFSampler,
         one step by default, at the guidance scale and interval given

A new family: its network and presets in network/, its objective in diffusion/, then a Family
here (docs/design.md).
"""
from dataclasses import dataclass
from typing import Callable

import torch

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.from_checkpoint import sampler_settings
from jitfast.diffusion.pmf_objective import PMFObjective
from jitfast.diffusion.pmf_sampler import PMFSampler, check_pmf_settings
from jitfast.diffusion.sampling import check_settings
from jitfast.io.pmf_weights import FUSED
from jitfast.network.pmf_presets import PMF_models
from jitfast.network.presets import JiT_models
from jitfast.training.draws import StepDraws
from jitfast.training.perceptual import load_perceptual
from jitfast.training.recipes import jit_training_defaults, pmf_training_defaults
from jitfast.util.sharded import full_tensor


@dataclass(frozen=True)
class Family:
    """name; presets {name: builder(input_size=, num_classes=, backend=, **network_options)};
    defaults(preset) -> {argument: value}; check(args): raises ValueError for settings the family
    cannot run (its grid's, options it does not offer); objective(net, args, device) -> the module
    whose
    forward(*inputs) is the loss, or (loss, extras) (its state dict holds the network under
    ``net.``, its ``metrics`` the names of the loss and its extras); inputs(objective, args,
    num_classes, device) -> draw(step, first, count, x, y) -> the step's inputs; grid(objective,
    ema, args, y, count, device) -> float32 images of the grid; sampling(setting) -> the
    keywords of the family sampler's ``generate`` that draw as a run's grid did, `setting(name,
    default)` reading the run's arguments (``io.checkpoint.training_setting``); muon_blocks: for
    the Muon
    optimizer (--optimizer muon), {Linear-name part: blocks} of the fused weights that are
    several matrices in the family's reference code (``training.muon.linear_matrices``), or None
    where the family's recipe has no Muon."""
    name: str
    presets: dict
    network_options: dict
    defaults: Callable
    check: Callable
    objective: Callable
    inputs: Callable
    grid: Callable
    sampling: Callable
    muon_blocks: dict = None


def jit_objective(net, args, device):
    # the sampler settings python -m jitfast.sample reads from this run's checkpoints
    settings = sampler_settings(vars(args), args.image_size)
    return Denoiser(net, P_mean=args.P_mean, P_std=args.P_std, label_drop_prob=0.0,
                    **settings)  # labels are dropped by the step's draws


def grid_settings(check, *settings):
    """The family sampler's `check` of the grid's settings (the grid is drawn after training)."""
    try:
        check(*settings)
    except ValueError as err:
        raise ValueError(f"the sample grid's settings: {err}") from None


def jit_check(args):
    if args.cfg_beta is not None:
        raise ValueError("--cfg-beta belongs to pMF's objective; JiT's training has no guidance")
    if args.data_proportion is not None:
        raise ValueError("--data-proportion belongs to pMF's objective; JiT's trains one time "
                         "per example")
    if args.optimizer == "muon":
        raise ValueError("--optimizer muon is pMF's recipe; JiT's is AdamW (the official code's)")
    if args.perceptual is not None:
        raise ValueError("--perceptual belongs to pMF's objective; JiT's loss has no "
                         "perceptual terms")
    grid_settings(check_settings, args.sample_steps, args.sample_method, args.sample_cfg,
                  tuple(args.sample_interval), args.sample_schedule)


def jit_inputs(objective, args, num_classes, device):
    """(x, y, t, noise): the dropped labels made the null class."""
    draws = StepDraws(args.seed, args.batch_size, (3, args.image_size, args.image_size),
                      objective.sample_t, args.label_drop_prob, device)
    null = torch.tensor(num_classes, device=device)
    buffer = {}

    def draw(step, first, count, x, y):
        t, buffer["noise"], drop = draws(step, first, count, buffer.get("noise"))
        return x, torch.where(drop, null, y), t, buffer["noise"]
    return draw


def jit_grid(objective, ema, args, y, count, device):
    """EMA 1's samples: on one GPU from a bf16 copy of it (no per-evaluation casts), else (the
    CPU's float32, FSDP's shards) from the model with EMA 1 swapped in."""
    gen = torch.Generator(device).manual_seed(args.seed)
    settings = dict(steps=args.sample_steps, method=args.sample_method,
                    cfg=args.sample_cfg if y is not None else 1.0, generator=gen,
                    interval=tuple(args.sample_interval), schedule=args.sample_schedule,
                    num_samples=count)
    if device.type == "cuda" and not args.fsdp:
        return objective.around(ema.network(objective.net)).generate(y, **settings)
    with ema.swapped(1), torch.autocast(device.type, torch.bfloat16,
                                        enabled=device.type == "cuda"):
        return objective.generate(y, **settings)


def jit_sampling(setting):
    """Denoiser.generate's settings of a run's grid (the official sampler's where unrecorded)."""
    interval = setting("sample_interval", None)
    return dict(steps=setting("sample_steps", 50), method=setting("sample_method", "heun"),
                cfg=setting("sample_cfg", 4.0), schedule=setting("sample_schedule", "linear"),
                **({} if interval is None else {"interval": tuple(interval)}))


def pmf_objective(net, args, device):
    terms = {} if args.perceptual is None else dict(
        perceptual=load_perceptual(args.perceptual, device), lpips_lambda=args.lpips_lambda,
        convnext_lambda=args.convnext_lambda, perceptual_max_t=args.perceptual_max_t)
    return PMFObjective(net, noise_scale=args.noise_scale, P_mean=args.P_mean, P_std=args.P_std,
                        cfg_beta=args.cfg_beta, data_proportion=args.data_proportion,
                        class_dropout_prob=args.label_drop_prob, **terms)


# what pMF's training does not offer yet, and why
PMF_REFUSES = {
    "sample_method": "pMF samples with its own one-step rule: --sample-method is JiT's",
    "sample_schedule": "pMF samples with its own one-step rule: --sample-schedule is JiT's",
}


def pmf_check(args):
    given = [why for name, why in PMF_REFUSES.items() if getattr(args, name) not in (None, False)]
    if given:
        raise ValueError("; ".join(given))
    grid_settings(check_pmf_settings, args.sample_steps, args.sample_cfg,
                  tuple(args.sample_interval))


def pmf_inputs(objective, args, num_classes, device):
    """(x, y, t, r, fm, noise, omega, t_min, t_max, drop, fm_count): the draws, flat."""
    def draw(step, first, count, x, y):
        draws = objective.draw(args.batch_size, args.seed, step, first, count,
                               (3, args.image_size, args.image_size), device)
        return (x, y, *draws)
    return draw


def pmf_grid(objective, ema, args, y, count, device):
    """EMA 1's samples in --sample-steps evaluations (one by default) at guidance scale
    --sample-cfg on --sample-interval, from a copy of the network without its v-head (bf16 on
    a GPU)."""
    with ema.swapped(1):
        net = objective.net
        state = {k: full_tensor(v) for k, v in net.state_dict().items() if not k.startswith("v_")}
        with torch.device(device):
            copy = type(net)(**{**net.config, "v_head": False}, backend=net.backend)
        copy.load_state_dict(state)
    if device.type == "cuda":
        copy = copy.to(torch.bfloat16)
    sampler = PMFSampler(copy.eval(), noise_scale=objective.noise_scale,
                         omega=args.sample_cfg if y is not None else 1.0,
                         interval=tuple(args.sample_interval))
    gen = torch.Generator(device).manual_seed(args.seed)
    return sampler.generate(y, steps=args.sample_steps, generator=gen, num_samples=count)


def pmf_sampling(setting):
    """PMFSampler.generate's settings of a run's grid (one step; the guidance where unrecorded:
    the sampler's, its preset's)."""
    interval = setting("sample_interval", None)
    return dict(steps=setting("sample_steps", 1), omega=setting("sample_cfg", None),
                interval=None if interval is None else tuple(interval))


FAMILIES = {
    "JiT": Family("JiT", JiT_models, {}, jit_training_defaults, jit_check, jit_objective,
                  jit_inputs, jit_grid, jit_sampling),
    "pMF": Family("pMF", PMF_models, {"v_head": True}, pmf_training_defaults, pmf_check,
                  pmf_objective, pmf_inputs, pmf_grid, pmf_sampling,
                  muon_blocks={part: len(pieces) for part, pieces in FUSED.items()}),
}


def family_of(preset):
    """The family whose presets include `preset`."""
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    raise KeyError(f"unknown preset {preset!r}; choose one of {sorted(all_presets())}")


def all_presets():
    return [name for family in FAMILIES.values() for name in family.presets]

