"""A training run that starts from a parent checkpoint at a lower resolution
(``python -m jitfast.train --init-from``): the parent's network transferred, and its noise scale
scaled with it."""
import os

from jitfast.io.checkpoint import (CheckpointError, model_from_checkpoint, read_checkpoint,
                                   training_setting)
from jitfast.network.families import PRESET_DIFFERENCES
from jitfast.network.transfer import TransferError, transfer
from jitfast.training.families import family_of


def transferred_run(path, preset, image_size, num_classes, weights="ema1", backend="auto",
                    noise_scale=None):
    """For ``python -m jitfast.train --init-from``: (child network in train mode (a JiT, or a
    pMF with its v-head), the record of its parent for the child's checkpoints, the noise scale,
    a line saying what was done). The checkpoint's `weights` (any file ``load_checkpoint``
    reads) are transferred to `image_size` with the patch size of `preset`, whose architecture
    must be the parent's; the noise scale is `noise_scale` when given, else the parent's (1.0
    when it does not say) times the factor."""
    ckpt = read_checkpoint(path)
    family = family_of(preset)
    try:  # pMF's with its v-head, which its training needs
        parent = model_from_checkpoint(ckpt, weights, backend=backend, family=family.name,
                                       **family.network_options).train()
    except CheckpointError as err:
        raise TransferError(f"--init-from {path!r} cannot start a {preset} run: {err}") from None
    differences = PRESET_DIFFERENCES[family.name](parent.config, preset)
    patch = differences.pop("patch_size", (None, parent.patch_size))[1]
    differ = [f"{k} {ours} vs {theirs}" for k, (ours, theirs) in differences.items()]
    if differ:
        raise TransferError(f"--model {preset} is not the architecture of {path!r} "
                            f"({', '.join(differ)}): pass the parent's architecture with the "
                            f"patch size for {image_size} px")
    if parent.num_classes != num_classes:
        raise TransferError(f"{path!r} has {parent.num_classes} classes, the data "
                            f"{num_classes}: transfer keeps the class table")
    child = transfer(parent, image_size, patch)
    factor = patch // parent.patch_size
    parent_noise = training_setting(ckpt, "noise_scale", None)
    parent_noise = None if parent_noise is None else float(parent_noise)
    if noise_scale is None:
        base = 1.0 if parent_noise is None else parent_noise
        noise_scale = base * factor
        unknown = " (not recorded, assumed)" if parent_noise is None else ""
        why = f"the parent's {base:g}{unknown} x {factor}; --noise-scale overrides"
    else:
        why = "--noise-scale"
    args = ckpt.get("args")
    record = {"path": os.path.abspath(path), "weights": weights, "step": ckpt.get("step"),
              "epoch": ckpt.get("epoch"), "image_size": parent.input_size,
              "patch_size": parent.patch_size, "factor": factor, "noise_scale": parent_noise,
              "args": args if isinstance(args, dict) else None}
    line = (f"init from {path} ({weights}, step {ckpt.get('step')}): {parent.input_size} px "
            f"patch {parent.patch_size} -> {image_size} px patch {patch} (factor {factor}); "
            f"noise scale {noise_scale:g} ({why})")
    return child, record, noise_scale, line
