"""Export a JiT or pixel MeanFlow (pMF) network for sampling without Python: ``python -m
jitfast.export --ckpt CKPT --out model.pt2``, then ``jitfast-sample`` (the C++ program built by
the top-level CMakeLists.txt).

The network's forward (JiT's ``net(x, t, y)``, pMF's ``net(z, t, h, omega, t_min, t_max, y)``)
is captured by ``torch.export`` with a dynamic batch and compiled by AOTInductor into one package
file. The package's metadata carries what the C++ sampler needs and checks (all values are
strings): the format version, the model family ("jit" or "pmf"), the image size, channels and
number of classes, the sampler settings (JiT: noise_scale, t_eps, prediction target; pMF:
noise_scale and the default guidance omega, t_min, t_max), and the device, dtype and largest
image batch the package was made for. The network is rebuilt on the pure-PyTorch ops (Inductor
compiles them itself; the Triton custom ops would be opaque launches a package cannot carry)
with its value checks off (they call ``.item()``).
"""
import argparse
import os

import torch

from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint, sampler_for
from jitfast.io.checkpoint import WEIGHT_KEYS

# of the metadata below; jitfast-sample reads this version and 1 (JiT packages from before the
# family key) and refuses others
FORMAT_VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILED_NAMESPACES = ("aten", "prims")  # ops AOTInductor lowers to code in the package


class ExportError(ValueError):
    """Export settings or a network that cannot be packaged, with what to do."""


def package_metadata(net, settings, device, dtype, max_batch):
    """The package's metadata: strings under ``jitfast.*`` keys (AOTInductor adds its own).
    settings: the sampler's ``package_settings()`` (floats: str is their repr)."""
    return {f"jitfast.{key}": str(value) for key, value in dict(
        format=FORMAT_VERSION, family=net.family.lower(),
        input_size=net.input_size, in_channels=net.in_channels, num_classes=net.num_classes,
        **settings, device=device, dtype=dtype, max_batch=max_batch).items()}


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


def export(net, path, noise_scale=None, t_eps=None, pred=None, device="cpu", dtype="float32",
           max_batch=256, omega=None, interval=None):
    """Compile the JiT or PMF `net` into an AOTInductor package at `path` for
    ``jitfast-sample``.

    The sampler settings (None: the family's default; ``diffusion.from_checkpoint.sampler_for``): for a JiT,
    noise_scale, t_eps and pred (as in ``Denoiser``); for a PMF, noise_scale and the default
    guidance omega and interval (as in ``PMFSampler``). device ("cpu" or "cuda") and dtype
    ("float32" or "bfloat16") are those the network runs in (the sampler's state stays
    float32). The batch is dynamic from 1 to 2·max_batch: a guided JiT evaluation runs the
    conditional and unconditional halves as one batch (a pMF step is one pass of max_batch at
    most). `net` itself is left untouched. Returns the package path.
    """
    try:
        sampler = sampler_for(net, noise_scale=noise_scale, t_eps=t_eps, pred=pred, omega=omega,
                              interval=interval)
    except ValueError as err:
        raise ExportError(str(err)) from None
    return export_sampler(sampler, path, device, dtype, max_batch)


def export_sampler(sampler, path, device="cpu", dtype="float32", max_batch=256):
    """``export`` of a sampler's network with its settings (``package_settings``)."""
    net = sampler.net
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device 'cuda' asked for, but torch sees no CUDA device here")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    settings = sampler.package_settings()
    model = type(net)(**net.config, backend="torch")
    model.load_state_dict(net.state_dict())
    model = model.to(device, DTYPES[dtype]).eval()
    model.check_values = False
    inputs = model.example_inputs(2, device, DTYPES[dtype])
    batch = torch.export.Dim("batch", min=1, max=2 * max_batch)
    with torch.no_grad():
        program = torch.export.export(model, tuple(inputs.values()),
                                      dynamic_shapes={name: {0: batch} for name in inputs})
    check_compiled_ops(program)
    metadata = package_metadata(model, settings, device, dtype, max_batch)
    return torch._inductor.aoti_compile_and_package(
        program, package_path=os.fspath(path),
        inductor_configs={"aot_inductor.metadata": metadata})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.export",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--ckpt", required=True, help="checkpoint file or model folder (any published layout; "
        "JiT or pMF weights)")
    add("--out", required=True, help="package file to write, e.g. model.pt2")
    add("--weights", default=None, choices=sorted(WEIGHT_KEYS),
        help="weights to use (default: ema1 of a training checkpoint, else the file's one set)")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="device the package runs on")
    add("--dtype", default="float32", choices=sorted(DTYPES),
        help="network precision (the sampler's state is always float32)")
    add("--max-batch", type=int, default=256,
        help="largest image batch per network call (guided JiT calls run twice as many)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        sampler = denoiser_from_checkpoint(args.ckpt, args.weights, backend="torch")
        net, settings = sampler.net, sampler.package_settings()
        export_sampler(sampler, args.out, args.device, args.dtype, args.max_batch)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.out}: {net.family} at {net.input_size} px, {net.in_channels} channels, "
          f"{net.num_classes} classes, {args.dtype} on {args.device}, up to {args.max_batch} "
          f"images per call; " + ", ".join(f"{k} {v}" for k, v in settings.items()))


if __name__ == "__main__":
    main()
