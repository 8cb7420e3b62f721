"""Autotuning keys: every autotuned kernel tunes separately for problem sizes far apart (batch 1
and batch 128 want different tiles) and once for a run of fixed shapes. On the CPU the
interpreter's autotune keeps one config and so never keys its cache; the tests give it two
(the same config twice) and a benchmark that times nothing, so launches key the cache as on a
GPU."""
import importlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")

from jitfast import kernels  # noqa: E402
from jitfast.kernels._common import row_bucket  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
MODULES = ("norm", "output_head", "patch_embed", "qk_norm_rope")
AUTOTUNED = {f"{module}.{name}": kernel for module in MODULES
             for name, kernel in vars(importlib.import_module(f"jitfast.kernels.{module}")).items()
             if isinstance(kernel, triton.runtime.Autotuner)}


def randn(*shape):
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


def data(*shape):
    """An input that gets no grad (an image, times, RoPE tables)."""
    return torch.rand(*shape, device=DEVICE)


# Forward and backward of each module's ops at batch B, with 4 to 8 rows a sample (a head's
# rows for qk_norm_rope): rows 9·k and 10·k share a power-of-two bucket, 40·k is in another.
LAUNCHES = {
    "norm": lambda B: [kernels.rms_norm(randn(B, 5, 40), randn(40)),
                       *kernels.gated_residual_rms_norm_modulate(
                           randn(B, 5, 40), randn(B, 5, 40), randn(B, 40), randn(40),
                           randn(B, 40), randn(B, 40))],
    "output_head": lambda B: [kernels.output_head(randn(B, 4, 40), randn(48, 40), randn(48), 4, 3),
                              kernels.output_head_v_loss(randn(B, 4, 40), randn(48, 40),
                                                         randn(48), data(B, 3, 8, 8), data(B),
                                                         4)],
    "patch_embed": lambda B: [kernels.patch_embed(randn(B, 3, 8, 12), randn(12, 3, 4, 4),
                                                  randn(40, 12, 1, 1), randn(40),
                                                  randn(1, 6, 40))],
    "qk_norm_rope": lambda B: list(kernels.qk_norm_rope(randn(B, 4, 3 * 2 * 8), 2, randn(8),
                                                        randn(8), data(4, 8), data(4, 8))),
}


def launch(module, batch):
    outputs = LAUNCHES[module](batch)
    torch.autograd.backward(outputs, [torch.randn_like(out) for out in outputs])


def test_row_bucket_is_coarse():
    """Powers of two at or above the rows, at least 16: batch 1 and batch 128 (256 and 32,768
    tokens at 256 px, patch 16) in buckets far apart, nearby row counts in one."""
    assert [row_bucket(n) for n in (1, 16, 17, 256, 300, 512, 32768)] == [
        16, 16, 32, 256, 512, 512, 32768]


@pytest.mark.parametrize("name", AUTOTUNED)
def test_autotune_key_includes_the_row_bucket(name):
    kernel = AUTOTUNED[name]
    assert "ROW_BUCKET" in kernel.keys and "ROW_BUCKET" in kernel.arg_names


@pytest.mark.parametrize("name", AUTOTUNED)
def test_autotuning_tunes_once_per_row_bucket(monkeypatch, name):
    """Batches 9 and 10 share one tuned config; batch 40 (4x the rows) tunes its own."""
    for kernel in AUTOTUNED.values():
        monkeypatch.setattr(kernel, "configs", kernel.configs[:1] * 2)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kwargs: 0.0)
    kernel = AUTOTUNED[name]
    module = name.split(".")[0]
    launch(module, 9)
    tuned = set(kernel.cache)  # a key per form of the op (flags, dtypes) launched
    assert tuned, "the launches did not key the autotune cache"
    launch(module, 10)
    assert set(kernel.cache) == tuned
    launch(module, 40)
    assert len(kernel.cache) == 2 * len(tuned)
