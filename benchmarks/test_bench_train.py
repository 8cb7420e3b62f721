"""Training throughput: one optimizer step (forward, backward, AdamW, both EMAs) in images/s and
MFU for each variant of ``jitfast.measure.workloads.TRAIN_VARIANTS``: the PyTorch reference eager
(the baseline) and compiled; on CUDA the Triton kernels eager, compiled, with torch.compile's CUDA
graphs of the model, and with the whole step replayed from one CUDA graph."""
import pytest

from conftest import DEVICE, ON_CUDA, skip_unless_cuda
from jitfast import train
from jitfast.measure.throughput import TRAIN_FACTOR, forward_flops
from jitfast.measure.workloads import (TRAIN_VARIANTS, cuda_only, jit_loss_step, pmf_loss_step,
                                       run_step, training_step)

# (preset, image size, batch)
SIZES = [("JiT-B/16", 256, 128), ("JiT-B/16", 256, 256), ("JiT-L/16", 256, 64),
         ("JiT-H/16", 256, 64)] if ON_CUDA else [("JiT-T/8", 64, 16)]


@pytest.mark.parametrize("variant", list(TRAIN_VARIANTS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{s[0]}-b{s[2]}" for s in SIZES])
def test_train_step(measure, size, variant):
    if cuda_only(variant):
        skip_unless_cuda(variant)
    preset, image, batch = size
    measure(training_step(*size, variant, DEVICE), f"train step {preset} batch {batch}", "train",
            variant, baseline=variant == next(iter(TRAIN_VARIANTS)), images=batch,
            flops=TRAIN_FACTOR * forward_flops(preset, image) * batch, preset=preset,
            shape=f"{batch}x{image}px")


@pytest.mark.parametrize("matmuls", ["cublas", "fused"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{s[0]}-b{s[2]}" for s in SIZES])
def test_train_step_mlp_matmuls(measure, monkeypatch, size, matmuls):
    """The graphed step (triton+graph) with the SwiGLU MLP as cuBLAS's matmuls around the SwiGLU
    kernel (JITFAST_FUSED_MLP=0, the baseline) and with SwiGLU in the epilogues of Triton
    matmuls (the default): benchmarks/NOTES.md predicts the second 3.4 ms faster at B/16."""
    skip_unless_cuda("triton+graph")
    from jitfast.kernels import swiglu_matmul
    monkeypatch.setattr(swiglu_matmul, "FUSED", matmuls == "fused")
    preset, image, batch = size
    measure(training_step(*size, "triton+graph", DEVICE),
            f"train step {preset} batch {batch}, the MLP's matmuls", "train", matmuls,
            baseline=matmuls == "cublas", images=batch,
            flops=TRAIN_FACTOR * forward_flops(preset, image) * batch, preset=preset,
            shape=f"{batch}x{image}px")


# (JiT preset, pMF configuration of the same width, image size, batch): pMF-B/16 is JiT-B/16's
# width and heads with 16 + 8 blocks (8 shared, 8 a head) at 276 tokens; pMF-T/8 is JiT-T/8's
PAIRS = [("JiT-B/16", "pMF-B/16", 256, 64)] if ON_CUDA else [("JiT-T/8", "pMF-T/8", 64, 8)]


@pytest.mark.parametrize("family", ["JiT", "pMF"])
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{p[1]}-b{p[3]}" for p in PAIRS])
def test_loss_backward(measure, pair, family):
    """The loss and its backward, no optimizer: JiT's objective (the baseline) beside pMF's
    (its v-head guidance pass, the JVP pass with tangents through the fused ops, the backward),
    with the network passes of pMF's step in the row."""
    jit, pmf, image, batch = pair
    if family == "JiT":
        fn, info = jit_loss_step(jit, image, batch, DEVICE), {}
    else:
        fn, objective = pmf_loss_step(pmf, image, batch, DEVICE)
        info = {"passes": objective.passes(batch)}
    measure(fn, f"loss + backward {pmf} vs {jit} batch {batch}", "train", family,
            baseline=family == "JiT", images=batch, preset=jit if family == "JiT" else pmf,
            shape=f"{batch}x{image}px", **info)


# python -m jitfast.train's runs, each step as the command builds it (its family's recipe,
# draws, optimizer and EMAs; on CUDA the whole step in one graph): what its log's img/s should
# read. CPU: the quick starts (28 px on the built-in Fashion-MNIST, batch 32), by default and as
# the README runs them (JiT with --compile, pMF with --compile --precision bf16); CUDA: the B/16s.
QUICK_STARTS = {"JiT-T/4": ["--compile"], "pMF-T/4": ["--compile", "--precision", "bf16"]}
COMMANDS = [("JiT-B/16", 256, 128, []), ("pMF-B/16", 256, 128, [])] if ON_CUDA else \
    [("JiT-T/4", 28, 32, []), ("pMF-T/4", 28, 32, []),
     *((model, 28, 32, flags) for model, flags in QUICK_STARTS.items())]


@pytest.mark.parametrize("command", COMMANDS,
                         ids=[f"{c[0]}-b{c[2]}{''.join(c[3])}" for c in COMMANDS])
def test_step_of_the_training_command(measure, command):
    """One step of ``python -m jitfast.train --model MODEL [flags]``: JiT's (the baseline) and
    pMF's."""
    model, image, batch, flags = command
    args = train.parse_args(["--model", model, "--image-size", str(image), "--batch-size",
                             str(batch), "--device", DEVICE.type, *flags])
    how = " as the README runs it" if flags else ""
    measure(run_step(args, 10, DEVICE), f"training command's step{how}, {COMMANDS[1][0]} vs "
            f"{COMMANDS[0][0]} batch {batch}", "train", f"{model} {' '.join(flags)}".strip(),
            baseline=model == COMMANDS[0][0], images=batch, preset=model,
            shape=f"{batch}x{image}px")
