"""Named JiT configurations: the official ones, JiT-G, and small presets for CPU training.

Names follow the official ``JiT-{arch}/{patch}``: patch 16 is meant for 256 px, 32 for 512 px.
"""
from functools import partial

from jitfast.network.model import JiT

# arch: (depth, hidden_size, num_heads, bottleneck_dim, in_context_len, in_context_start)
ARCHITECTURES = {
    "B": (12, 768, 12, 128, 32, 4),
    "L": (24, 1024, 16, 128, 32, 8),
    "H": (32, 1280, 16, 256, 32, 10),
    "G": (40, 1664, 16, 256, 32, 10),
    # Small presets (not in the paper) that train in minutes on a CPU at 32-64 px. N is the quick
    # start's: as deep as T at 2/3 of its width, 2.2x the steps in the same minutes, and better
    # samples in those minutes (docs/quickstart.md).
    "N": (6, 128, 2, 32, 8, 2),
    "T": (6, 192, 3, 32, 8, 2),
    "S": (8, 256, 4, 64, 16, 2),
}
PATCH_SIZES = {"B": (16, 32), "L": (16, 32), "H": (16, 32), "G": (16, 32),
               "N": (4, 8), "T": (4, 8), "S": (4, 8)}


def preset_config(name):
    """The architecture keywords of a preset (everything but input_size and num_classes)."""
    try:
        arch, patch = name[len("JiT-"):].split("/")
        depth, hidden, heads, bottleneck, ic_len, ic_start = ARCHITECTURES[arch]
        if int(patch) not in PATCH_SIZES[arch] or not name.startswith("JiT-"):
            raise KeyError(name)
    except (KeyError, ValueError):
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(JiT_models)}") from None
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, bottleneck_dim=bottleneck,
                in_context_len=ic_len, in_context_start=ic_start, patch_size=int(patch))


def preset_differences(config, name):
    """{field: (config's value, the preset's)} for each architecture field of preset `name` on
    which the JiT config `config` differs from it; KeyError for an unknown name."""
    return {k: (config[k], v) for k, v in preset_config(name).items() if config[k] != v}


def build(name, **kwargs):
    """A JiT of preset `name`; keyword arguments (input_size, num_classes, ...) override it."""
    return JiT(**{**preset_config(name), **kwargs})


JiT_models = {f"JiT-{arch}/{patch}": partial(build, f"JiT-{arch}/{patch}")
              for arch, patches in PATCH_SIZES.items() for patch in patches}
