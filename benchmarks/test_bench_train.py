"""Training throughput: one optimizer step (forward, backward, AdamW, both EMAs) in images/s and
MFU for each variant of ``jitfast.measure.workloads.TRAIN_VARIANTS``: the PyTorch reference eager
(the baseline) and compiled; on CUDA the Triton kernels eager, compiled, with torch.compile's CUDA
graphs of the model, and with the whole step replayed from one CUDA graph."""
import pytest

from conftest import DEVICE, ON_CUDA, skip_unless_cuda
from jitfast.measure.throughput import TRAIN_FACTOR, forward_flops
from jitfast.measure.workloads import TRAIN_VARIANTS, cuda_only, training_step

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
