"""Named pMF configurations of the official port (``pmfDiT_{B,L,H}_{16,32}``), with the sampling
settings its README evaluates each with: the noise scale, and the guidance scale omega and
interval [t_min, t_max] that are the network's own inputs (pMF's time: t = 1 is noise).

Names follow JiT's: ``pMF-{arch}/{patch}``, patch 16 at 256 px, 32 at 512 px.
"""
from functools import partial

from jitfast.network.pmf import PMF, default_bottleneck, official_mlp_hidden

# arch: (depth, hidden_size, num_heads)
PMF_ARCHITECTURES = {"B": (16, 768, 12), "L": (32, 1024, 16), "H": (48, 1280, 16)}
# name: (noise_scale, omega, (t_min, t_max)) — pmf.py's noise scales; the README's evaluation
# commands (B/16: evaluate.py's defaults)
PMF_SAMPLING = {
    "pMF-B/16": (1.0, 7.5, (0.1, 0.8)),
    "pMF-L/16": (1.0, 7.0, (0.2, 0.7)),
    "pMF-H/16": (2.0, 7.0, (0.2, 0.6)),
    "pMF-B/32": (2.0, 6.5, (0.1, 0.7)),
    "pMF-L/32": (4.0, 7.5, (0.2, 0.6)),
    "pMF-H/32": (4.0, 5.5, (0.1, 0.6)),
}
HEAD_DEPTH = 8
# CPU-sized presets (not the paper's), for minutes of training at 28-64 px: JiT-T's width, heads
# and bottleneck, 2 shared blocks and 2 per head (6 blocks in a step's passes, as JiT-T's)
SMALL = {f"pMF-T/{patch}": dict(patch_size=patch, hidden_size=192, depth=4, num_heads=3,
                                head_depth=2, bottleneck_dim=32) for patch in (4, 8)}


def pmf_preset_config(name):
    """The PMF keywords of a preset (input_size included: 256 px for patch 16, 512 for 32, 64 px
    for the small ones)."""
    if name in SMALL:
        return {"input_size": 64, **SMALL[name]}
    if name not in PMF_SAMPLING:
        raise KeyError(f"unknown pMF preset {name!r}; choose one of "
                       f"{sorted([*PMF_SAMPLING, *SMALL])}")
    arch, patch = name[len("pMF-"):].split("/")
    depth, hidden, heads = PMF_ARCHITECTURES[arch]
    return dict(input_size=16 * int(patch), patch_size=int(patch), hidden_size=hidden,
                depth=depth, num_heads=heads, head_depth=HEAD_DEPTH)


def pmf_architecture(name):
    """The architecture keywords of a preset: ``pmf_preset_config``'s but the image size, with
    the widths it derives (the image size and number of classes are not part of a preset's
    architecture); KeyError for an unknown name."""
    preset = pmf_preset_config(name)
    del preset["input_size"]
    hidden = preset["hidden_size"]
    return {"mlp_hidden": official_mlp_hidden(hidden),
            "bottleneck_dim": default_bottleneck(hidden), "in_channels": 3, **preset}


def pmf_preset_differences(config, name):
    """{field: (config's value, the preset's)} for each architecture field of pMF preset `name`
    on which the PMF config `config` differs from it; KeyError for an unknown name."""
    return {k: (config.get(k, v), v) for k, v in pmf_architecture(name).items()
            if config.get(k, v) != v}


def pmf_preset_of(config):
    """The paper's preset whose architecture `config` (PMF keywords) has, or None."""
    return next((name for name in PMF_SAMPLING if not pmf_preset_differences(config, name)),
                None)


def build(name, **kwargs):
    """A PMF of preset `name`; keyword arguments (num_classes, backend, ...) override it."""
    return PMF(**{**pmf_preset_config(name), **kwargs})


PMF_models = {name: partial(build, name) for name in [*PMF_SAMPLING, *SMALL]}
