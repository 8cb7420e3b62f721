"""The user's feature networks for pMF's perceptual terms (its configs' LPIPS and ConvNeXt losses
on x̂ = z - t·u). jitfast ships none: ``--perceptual MODULE:FACTORY`` (or ``FILE.py:FACTORY``)
names a function that returns them as one callable (x̂, x) -> (lpips, convnext), each (B,), on
NCHW images in [-1, 1]."""
import importlib
import importlib.util
import os

import torch

from jitfast.training.errors import TrainingError


def load_perceptual(spec, device):
    """The callable of ``FACTORY()`` named by `spec` ("package.module:factory" or
    "path/file.py:factory"), an ``nn.Module`` moved to `device`, frozen and in eval mode. It is
    returned inside a plain function, so that the objective does not hold it as a submodule:
    its weights stay out of the optimizer, the EMAs and the checkpoints."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise TrainingError(f"--perceptual {spec!r}: give MODULE:FACTORY or FILE.py:FACTORY, "
                            f"e.g. my_features.py:make")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"--perceptual: {where!r} does not exist")
        found = importlib.util.spec_from_file_location(
            f"jitfast_perceptual_{os.path.basename(where)[:-3]}", where)
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise TrainingError(f"--perceptual {spec!r}: cannot import {where} ({err})") \
                from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise TrainingError(f"--perceptual {spec!r}: {where} has no function {name!r}")
    features = factory()
    if isinstance(features, torch.nn.Module):
        features = features.to(device).eval().requires_grad_(False)
    if not callable(features):
        raise TrainingError(f"--perceptual {spec!r}: {name}() returned a "
                            f"{type(features).__name__}, not a callable (x_hat, x) -> (lpips, "
                            f"convnext)")
    return lambda x_hat, x: features(x_hat, x)
