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


def test_pmf_training_replays_its_step_from_one_cuda_graph(tmp_path):
    """pMF's step (the v-head's guidance pass, the JVP pass, Muon and the EDM EMAs) captured once
    and replayed follows the eager step, on the fused kernels."""
    pmf = ["--model", "pMF-T/4", "--image-size", "32", "--batch-size", "8", "--steps", "8",
           "--log-every", "1", "--device", "cuda", "--grid-classes", "2",
           "--samples-per-class", "2", "--backend", "triton"]

    def parts(name, *extra):
        result = train.main(pmf + ["--out", str(tmp_path / name), *extra])
        return torch.tensor([[r["loss_u"], r["loss_v"]] for r in read_metrics(result["metrics"])])
    graphed, eager = parts("graphed", "--cuda-graph", "on"), parts("eager", "--cuda-graph", "off")
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=1e-3)
