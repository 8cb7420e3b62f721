"""Export a JiT for sampling without Python: ``python -m jitfast.export --ckpt CKPT --out
model.pt2``, then ``jitfast-sample`` (the C++ program built by the top-level CMakeLists.txt).

The network's forward ``net(x, t, y)`` is captured by ``torch.export`` with a dynamic batch and
compiled by AOTInductor into one package file. The package's metadata carries what the C++
sampler needs and checks (all values are strings): the format version, the image size, channels
and number of classes, the sampler settings (noise_scale, t_eps, prediction target), and the
device, dtype and largest image batch the package was made for. The network is rebuilt on the
pure-PyTorch ops (Inductor compiles them itself; the Triton custom ops would be opaque launches a
package cannot carry) with its value checks off (they call ``.item()``).
"""
import argparse
import os

import torch

from jitfast.diffusion.denoiser import SPACES
from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.network.model import JiT

FORMAT_VERSION = 1  # of the metadata below; jitfast-sample refuses other versions
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILED_NAMESPACES = ("aten", "prims")  # ops AOTInductor lowers to code in the package


class ExportError(ValueError):
    """Export settings or a network that cannot be packaged, with what to do."""


def package_metadata(net, noise_scale, t_eps, pred, device, dtype, max_batch):
    """The package's metadata: strings under ``jitfast.*`` keys (AOTInductor adds its own)."""
    return {f"jitfast.{key}": str(value) for key, value in dict(
        format=FORMAT_VERSION, input_size=net.input_size, in_channels=net.in_channels,
        num_classes=net.num_classes, noise_scale=repr(float(noise_scale)),
        t_eps=repr(float(t_eps)), pred=pred, device=device, dtype=dtype,
        max_batch=max_batch).items()}


def check_compiled_ops(program):
    """Refuse a graph that calls ops from other libraries (flash-attn, custom kernels): the
    package would need them loaded at run time, which jitfast-sample does not do."""
    foreign = sorted({str(node.target) for node in program.graph.nodes
                      if isinstance(node.target, torch._ops.OpOverload)
                      and node.target.namespace not in COMPILED_NAMESPACES})
    if foreign:
        raise ExportError(f"the exported network calls ops that an AOTInductor package cannot "
                          f"carry: {', '.join(foreign)} (is flash-attn installed? export in an "
                          f"environment without it, so that attention uses PyTorch's SDPA)")


def export(net, path, noise_scale=1.0, t_eps=0.05, pred="x", device="cpu", dtype="float32",
           max_batch=256):
    """Compile the JiT `net` into an AOTInductor package at `path` for ``jitfast-sample``.

    noise_scale, t_eps and pred are the sampler settings (as in ``Denoiser``); device ("cpu" or
    "cuda") and dtype ("float32" or "bfloat16") are those the network runs in (the sampler's
    state stays float32). The batch is dynamic from 1 to 2·max_batch: a guided evaluation runs
    the conditional and unconditional halves as one batch. `net` itself is left untouched.
    Returns the package path.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device 'cuda' asked for, but torch sees no CUDA device here")
    if pred not in SPACES:
        raise ExportError(f"pred must be one of {SPACES}, got {pred!r}")
    if noise_scale <= 0 or t_eps <= 0:
        raise ExportError(f"noise_scale and t_eps must be positive, got {noise_scale}, {t_eps}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    model = JiT(**net.config, backend="torch")
    model.load_state_dict(net.state_dict())
    model = model.to(device, DTYPES[dtype]).eval()
    model.check_values = False
    size, channels = model.input_size, model.in_channels
    example = (torch.zeros(2, channels, size, size, device=device, dtype=DTYPES[dtype]),
               torch.full((2,), 0.5, device=device),
               torch.zeros(2, dtype=torch.long, device=device))
    batch = torch.export.Dim("batch", min=1, max=2 * max_batch)
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes={
            "x": {0: batch}, "t": {0: batch}, "y": {0: batch}})
    check_compiled_ops(program)
    metadata = package_metadata(model, noise_scale, t_eps, pred, device, dtype, max_batch)
    return torch._inductor.aoti_compile_and_package(
        program, package_path=os.fspath(path),
        inductor_configs={"aot_inductor.metadata": metadata})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.export",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--ckpt", required=True, help="checkpoint file or model folder (any published layout)")
    add("--out", required=True, help="package file to write, e.g. model.pt2")
    add("--weights", default="ema1", choices=("ema1", "ema2", "model"), help="weights to use")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="device the package runs on")
    add("--dtype", default="float32", choices=sorted(DTYPES),
        help="network precision (the sampler's state is always float32)")
    add("--max-batch", type=int, default=256,
        help="largest image batch per network call (guided calls run twice as many)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        sampler = denoiser_from_checkpoint(args.ckpt, args.weights, backend="torch")
        net = sampler.net
        settings = dict(noise_scale=sampler.noise_scale, t_eps=sampler.t_eps, pred=sampler.pred)
        export(net, args.out, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
               **settings)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.out}: JiT at {net.input_size} px, {net.in_channels} channels, "
          f"{net.num_classes} classes, {args.dtype} on {args.device}, up to {args.max_batch} "
          f"images per call; " + ", ".join(f"{k} {v}" for k, v in settings.items()))


if __name__ == "__main__":
    main()
