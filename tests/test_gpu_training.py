"""On a GPU: 200 steps of bf16 training on the built-in data with the fused kernels follow the
PyTorch reference's loss curve within the run-to-run noise (that of the reference with another
seed). Run with `pytest -m gpu`; on the CPU, test_kernels_model.py checks the float32 curve."""
import pytest
import torch

from jitfast import train
from jitfast.training.progress import read_metrics

pytestmark = pytest.mark.gpu
ARGS = ["--model", "JiT-T/8", "--image-size", "64", "--batch-size", "32", "--steps", "200",
        "--log-every", "20", "--device", "cuda", "--sample-steps", "2", "--grid-classes", "2",
        "--samples-per-class", "2"]


def curve(tmp_path, name, *extra):
    result = train.main(ARGS + ["--out", str(tmp_path / name), *extra])
    return torch.tensor([r["loss"] for r in read_metrics(result["metrics"])])


def test_bf16_loss_curve_of_the_kernels_follows_the_reference(tmp_path):
    reference = curve(tmp_path, "torch", "--backend", "torch")
    fused = curve(tmp_path, "triton", "--backend", "triton")
    other_seed = curve(tmp_path, "seed1", "--backend", "torch", "--seed", "1")
    assert reference[-5:].mean() < reference[:2].mean()  # it learns
    noise = (reference[5:] - other_seed[5:]).abs().mean()  # per 20-step mean, past warm-up
    gap = (fused[5:] - reference[5:]).abs().mean()
    assert gap <= 2 * noise + 1e-3, (fused, reference, other_seed)
