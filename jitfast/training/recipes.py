"""The training recipe of each preset, the defaults of ``python -m jitfast.train``: the official
one for the paper's presets (JiT-B/L/H/G), the quick start's (docs/quickstart.md) for the
CPU-sized ones, which train for minutes, not epochs."""

# what each built-in dataset trains by default (docs/quickstart.md measured them), and data of
# one's own (--data-path)
DATASET_DEFAULTS = {"fashion-mnist": dict(model="JiT-T/4", image_size=28),
                    "shapes": dict(model="JiT-N/8", image_size=64),
                    None: dict(model="JiT-N/8", image_size=64)}
SMALL_ARCHS = ("N", "T", "S")  # CPU-sized presets: minutes of training, not epochs
OFFICIAL = dict(blr=5e-5, schedule="constant", P_mean=-0.8, ema_decays=(0.9999, 0.9996))
# a few hundred steps at 32-64 px: a larger lr that decays, EMAs over about 1/(1-decay) steps
# of them, and t not skewed to noise (-0.8 trains too little near clean images at that size)
QUICK_START = dict(blr=1.2e-2, schedule="cosine", P_mean=0.0, ema_decays=(0.99, 0.98))


def is_small(preset):
    """Whether `preset` (a name like JiT-N/8) is one of the CPU-sized presets."""
    return preset[len("JiT-"):].split("/")[0] in SMALL_ARCHS


def training_defaults(preset):
    """{argument: value} of the recipe of `preset` (ema_decays as a fresh list)."""
    recipe = QUICK_START if is_small(preset) else OFFICIAL
    return {**recipe, "ema_decays": list(recipe["ema_decays"])}
