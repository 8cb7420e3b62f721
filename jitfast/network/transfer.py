"""Resolution transfer: a network of either family (JiT, pMF) trained at one resolution becomes,
unchanged in its transformer body, one for k times the resolution at the same token grid
(JiT-B/16 at 256 px -> JiT-B/32 at 512 px, pMF-B/16 -> pMF-B/32). Only the pixel-facing maps
change:

- the patch embedding's first projection W1 (bottleneck, C, p, p) is spread over each k×k block
  and divided by k²: on a nearest-upsampled input it computes what W1 computed;
- each output Linear's rows (laid out (p, q, c)) and its bias are replicated over each k×k
  block: its output is the nearest upsampling of the old one (JiT's final layer; pMF's u-head
  and v-head, whose velocities (z - x̂)/t are then upsampled too).

So at initialisation net'(U z, ...) = U net(z, ...), U the nearest k× upsampling. With the noise
scale multiplied by k, the average of each k×k block of the new noise has the old noise's
variance: on block averages the child sees the inputs its parent was trained on.
"""
from fractions import Fraction

from jitfast.network.model import JiT
from jitfast.network.pmf import PMF

OUTPUT_LINEAR = "final_layer.linear."  # JiT's final_layer, pMF's u_ and v_final_layer


class TransferError(ValueError):
    """A resolution transfer that cannot be done, with what to do instead."""


def transfer(net, image_size, patch_size):
    """A new network of net's class (JiT or PMF) at `image_size` px with patches of
    `patch_size` px, function-preserving:
    ``transfer(net, ...)(U z, ...) == U net(z, ...)`` for U the nearest upsampling by the factor
    k = patch_size / net.patch_size (float32: to rounding); on any input x, the child computes
    U net(A x), A the k×k block average.

    Supported: integer factors k ≥ 1 that keep the token grid (image_size / patch_size equal to
    the parent's). Refused, with a TransferError: a patch size that does not divide the image,
    a non-integer (or shrinking) factor, and a changed token grid — that would need the position
    table (JiT's sin-cos, pMF's learned) and the 2-D RoPE interpolated to the new grid
    (positions scaled to the old range), which is not function-preserving and is not
    implemented.
    The result is on net's device and dtype, in net's train/eval mode, with its backend.
    """
    if not isinstance(net, (JiT, PMF)):
        raise TypeError(f"transfer needs a jitfast.JiT or PMF (unwrapped: not DDP, FSDP or "
                        f"compiled), got {type(net).__name__}")
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
    for name in [name for name in state if OUTPUT_LINEAR in name]:
        rows = state[name].unflatten(0, (p, p, C))  # (p, q, c[, D])
        rows = rows.repeat_interleave(k, 0).repeat_interleave(k, 1)
        state[name] = rows.flatten(0, 2)
    child = type(net)(**{**net.config, "input_size": image_size, "patch_size": patch_size},
                      backend=net.backend)
    child.load_state_dict(state)
    child.check_values = net.check_values
    return child.to(w1.device, w1.dtype).train(net.training)


def upsample_last2(w, k):
    """Nearest k× upsampling of the last two dimensions."""
    return w.repeat_interleave(k, -2).repeat_interleave(k, -1)
