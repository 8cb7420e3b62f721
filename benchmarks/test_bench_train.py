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


# the quick starts' runs (python -m jitfast.train --model M: 28 px on the built-in Fashion-MNIST,
# batch 32), each step as the trainer builds it: what its log's img/s should read
QUICK_STARTS = ["JiT-T/4", "pMF-T/4"]


@pytest.mark.parametrize("model", QUICK_STARTS)
def test_step_of_the_training_command(measure, model):
    """One step of ``python -m jitfast.train --model MODEL`` (its recipe's optimizer, EMAs and
    draws; eager, one process): the step the command's progress bar times, with its data."""
    args = train.parse_args(["--model", model, "--device", DEVICE.type])
    measure(run_step(args, 10, DEVICE), f"training command's step {model} batch "
            f"{args.batch_size}", "train", model, baseline=model == QUICK_STARTS[0],
            images=args.batch_size, preset=model, shape=f"{args.batch_size}x{args.image_size}px")
