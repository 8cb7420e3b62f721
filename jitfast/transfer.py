"""Resolution transfer (DESIGN.md §9): a JiT trained at one resolution becomes, unchanged in its
transformer body, a JiT for k times the resolution at the same token grid (JiT-B/16 at 256 px ->
JiT-B/32 at 512 px). Only the two pixel-facing maps change:

- the patch embedding's first projection W1 (bottleneck, C, p, p) is spread over each k×k block
  and divided by k²: on a nearest-upsampled input it computes what W1 computed;
- the output Linear's rows (laid out (p, q, c)) and its bias are replicated over each k×k block:
  its output is the nearest upsampling of the old one.

So at initialisation net'(U z, t, y) = U net(z, t, y), U the nearest k× upsampling. With the
noise scale multiplied by k, the average of each k×k block of the new noise has the old noise's
variance: on block averages the child sees the inputs its parent was trained on.
"""
import os
from fractions import Fraction

from jitfast.checkpoint import model_from_checkpoint, read_checkpoint
from jitfast.model import JiT
from jitfast.presets import preset_config


class TransferError(ValueError):
    """A resolution transfer that cannot be done, with what to do instead."""


def transfer(net, image_size, patch_size):
    """A new JiT at `image_size` px with patches of `patch_size` px, function-preserving:
    ``transfer(net, ...)(U z, t, y) == U net(z, t, y)`` for U the nearest upsampling by the factor
    k = patch_size / net.patch_size (float32: to rounding); on any input x, the child computes
    U net(A x), A the k×k block average.

    Supported: integer factors k ≥ 1 that keep the token grid (image_size / patch_size equal to
    the parent's). Refused, with a TransferError: a patch size that does not divide the image,
    a non-integer (or shrinking) factor, and a changed token grid — that would need the sin-cos
    position table and the 2-D RoPE interpolated to the new grid (positions scaled to the old
    range), which is not function-preserving and is not implemented.
    The result is on net's device and dtype, in net's train/eval mode, with its backend.
    """
    if not isinstance(net, JiT):
        raise TypeError(f"transfer needs a jitfast.JiT (unwrapped: not DDP, FSDP or compiled), "
                        f"got {type(net).__name__}")
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise TransferError(f"patch size {patch_size} does not divide image size {image_size}; "
                            f"choose a patch size that does")
    grid, new_grid = net.input_size // net.patch_size, image_size // patch_size
    if new_grid != grid:
        raise TransferError(
            f"{image_size} px with patch {patch_size} is a {new_grid}x{new_grid} token grid, the "
            f"model's is {grid}x{grid}: a changed grid needs the position table and RoPE "
            f"interpolated, which is not supported. Keep the grid: patch size "
            f"{net.patch_size} x (image size / {net.input_size})")
    factor = Fraction(patch_size, net.patch_size)
    if factor.denominator != 1:
        raise TransferError(f"the resolution factor {image_size}/{net.input_size} = "
                            f"{float(factor):g} is not an integer; transfer supports k = 2, 3, "
                            f"... (nearest upsampling by k)")
    k = int(factor)
    state = net.state_dict()
    w1 = state["x_embedder.proj1.weight"]  # (bottleneck, C, p, p)
    state["x_embedder.proj1.weight"] = upsample_last2(w1, k) / (k * k)
    C, p = net.out_channels, net.patch_size
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        rows = state[name].unflatten(0, (p, p, C))  # (p, q, c[, D])
        rows = rows.repeat_interleave(k, 0).repeat_interleave(k, 1)
        state[name] = rows.flatten(0, 2)
    child = JiT(**{**net.config, "input_size": image_size, "patch_size": patch_size},
                backend=net.backend)
    child.load_state_dict(state)
    child.check_values = net.check_values
    return child.to(w1.device, w1.dtype).train(net.training)


def upsample_last2(w, k):
    """Nearest k× upsampling of the last two dimensions."""
    return w.repeat_interleave(k, -2).repeat_interleave(k, -1)


def noise_scale_of(ckpt):
    """The noise scale a checkpoint was trained with (its args: a dict, or the official
    Namespace), or None when it does not say."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    value = args.get("noise_scale") if isinstance(args, dict) else getattr(args, "noise_scale",
                                                                            None)
    return None if value is None else float(value)


def transferred_run(path, preset, image_size, num_classes, weights="ema1", backend="auto",
                    noise_scale=None):
    """For ``python -m jitfast.train --init-from``: (child JiT in train mode, the record of its
    parent for the child's checkpoints, the noise scale, a line saying what was done). The
    checkpoint's `weights` (any file ``load_checkpoint`` reads) are transferred to `image_size`
    with the patch size of `preset`, whose architecture must be the parent's; the noise scale
    is `noise_scale` when given, else the parent's (1.0 when it does not say) times the factor."""
    ckpt = read_checkpoint(path)
    parent = model_from_checkpoint(ckpt, weights, backend=backend).train()
    wanted = preset_config(preset)
    patch = wanted.pop("patch_size")
    differ = [f"{k} {parent.config[k]} vs {v}" for k, v in wanted.items() if parent.config[k] != v]
    if differ:
        raise TransferError(f"--model {preset} is not the architecture of {path!r} "
                            f"({', '.join(differ)}): pass the parent's architecture with the "
                            f"patch size for {image_size} px")
    if parent.num_classes != num_classes:
        raise TransferError(f"{path!r} has {parent.num_classes} classes, the data "
                            f"{num_classes}: transfer keeps the class table")
    child = transfer(parent, image_size, patch)
    factor = patch // parent.patch_size
    parent_noise = noise_scale_of(ckpt)
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
