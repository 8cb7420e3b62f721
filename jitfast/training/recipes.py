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


# the sample grid of a JiT run: a preview in the fast setting of docs/samplers.md (the official
# sampler: --sample-method heun --sample-schedule linear --sample-steps 50)
JIT_GRID = dict(sample_steps=15, sample_method="unipc2", sample_schedule="cosine",
                sample_cfg=3.0, sample_interval=(0.0, 1.0))


def jit_training_defaults(preset):
    """``training_defaults`` with AdamW, the warm-up, P_std and the sample grid's settings."""
    return {**training_defaults(preset), "steps": 1600, "optimizer": "adamw", "warmup_steps": 50,
            "P_std": 0.8, **JIT_GRID,
            "sample_interval": list(JIT_GRID["sample_interval"])}


# pMF: the official configs (github Lyy-iiis/pMF, branch main, configs/pMF_*_config.yml) give per
# preset the noise distribution (P_mean, P_std), the noise scale, cfg_beta, the grid's `sampling`
# (one step at omega on [t_min, t_max]) and the perceptual terms' weights and cut-off
# (lpips_lambda, convnext_lambda, perceptual_max_t). H/16 and H/32 have no published config: L's,
# with the README's sampling. The small presets (CPU minutes at 28-64 px) are ours.
PMF_CONFIGS = {  # preset: (P_mean, P_std, noise_scale, cfg_beta, (omega, t_min, t_max),
    #                          (lpips_lambda, convnext_lambda, perceptual_max_t))
    "pMF-B/16": (0.8, 0.8, 1.0, 1.0, (8.5, 0.1, 0.7), (0.4, 0.1, 0.8)),  # pMF_B_16_config.yml
    "pMF-B/32": (0.8, 0.8, 2.0, 1.0, (6.5, 0.1, 0.7), (0.4, 0.1, 0.8)),  # pMF_B_32_config.yml
    "pMF-L/16": (0.8, 0.8, 1.0, 2.0, (7.0, 0.2, 0.7), (0.4, 0.1, 0.8)),  # pMF_L_16_config.yml
    "pMF-L/32": (0.0, 0.8, 4.0, 1.0, (7.5, 0.2, 0.6), (0.4, 0.1, 0.6)),  # pMF_L_32_config.yml
    "pMF-H/16": (0.8, 0.8, 1.0, 2.0, (7.0, 0.2, 0.6), (0.4, 0.1, 0.8)),  # L/16's; README's grid
    "pMF-H/32": (0.0, 0.8, 4.0, 1.0, (5.5, 0.1, 0.6), (0.4, 0.1, 0.6)),  # L/32's; README's grid
    "pMF-T/4": (1.2, 0.8, 1.0, 1.0, (2.5, 0.0, 1.0), (0.4, 0.1, 0.8)),  # docs/quickstart.md
    "pMF-T/8": (1.2, 0.8, 1.0, 1.0, (2.5, 0.0, 1.0), (0.4, 0.1, 0.8)),
}


PMF_DATA_PROPORTION = 0.5  # every config's (configs/default.py, model.data_proportion)
# the perceptual terms' arguments (on with --perceptual, the user's feature networks)
PERCEPTUAL_TERMS = ("lpips_lambda", "convnext_lambda", "perceptual_max_t")
# the configs' training (the same in all four): Muon for the Dense kernels and Adam (b2 0.95)
# for the rest at one constant lr, 1e-3 whatever the batch (learning_rate, adam_b2,
# lr_schedule warmup_const with warmup_epochs 0; utils/trainstate_util.py's optax.contrib.muon),
# and three EDM EMAs (ema_type edm, ema_val [500, 1000, 2000] kimg; utils/ema_util.py)
PMF_OFFICIAL = dict(steps=1600, optimizer="muon", lr=1e-3, schedule="constant", warmup_steps=0,
                    ema_halflives=(500, 1000, 2000))
# the small presets' (CPU minutes at 28-64 px; docs/quickstart.md measured it)
PMF_QUICK_START = dict(steps=800, optimizer="muon", lr=1e-2, schedule="cosine", warmup_steps=0,
                       ema_halflives=(0.5, 1, 2))


def pmf_training_defaults(preset):
    """{argument: value} of a pMF preset's recipe: its config's noise, guidance draws and grid,
    the configs' optimizer, lr and EMAs for the paper's presets, the quick start's for the small
    ones."""
    P_mean, P_std, noise_scale, cfg_beta, (omega, t_min, t_max), perceptual = \
        PMF_CONFIGS[preset]
    recipe = PMF_QUICK_START if is_small(preset) else PMF_OFFICIAL
    return {**recipe, "ema_halflives": list(recipe["ema_halflives"]), "P_mean": P_mean,
            "data_proportion": PMF_DATA_PROPORTION,
            "P_std": P_std, "noise_scale": noise_scale, "cfg_beta": cfg_beta, "sample_steps": 1,
            "sample_cfg": omega, "sample_interval": [t_min, t_max],
            **dict(zip(PERCEPTUAL_TERMS, perceptual))}
