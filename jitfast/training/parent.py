"""A training run that starts from a parent checkpoint at a lower resolution
(``python -m jitfast.train --init-from``): the parent's network transferred, and its noise scale
scaled with it."""
import os

from jitfast.io.checkpoint import model_from_checkpoint, read_checkpoint, training_setting
from jitfast.network.presets import preset_config, preset_differences
from jitfast.network.transfer import TransferError, transfer


def transferred_run(path, preset, image_size, num_classes, weights="ema1", backend="auto",
                    noise_scale=None):
    """For ``python -m jitfast.train --init-from``: (child JiT in train mode, the record of its
    parent for the child's checkpoints, the noise scale, a line saying what was done). The
    checkpoint's `weights` (any file ``load_checkpoint`` reads) are transferred to `image_size`
    with the patch size of `preset`, whose architecture must be the parent's; the noise scale
    is `noise_scale` when given, else the parent's (1.0 when it does not say) times the factor."""
    ckpt = read_checkpoint(path)
    parent = model_from_checkpoint(ckpt, weights, backend=backend).train()
    patch = preset_config(preset)["patch_size"]
    differ = [f"{k} {ours} vs {theirs}" for k, (ours, theirs)
              in preset_differences(parent.config, preset, ignore=("patch_size",)).items()]
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
