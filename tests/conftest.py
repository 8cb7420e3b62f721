"""Shared test setup. Without a GPU, the Triton kernels run on CPU tensors under Triton's
interpreter; the switch must be set before Triton is first imported, hence here."""
import importlib.util
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON = pytest.param("triton", marks=[
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="the fused kernels need Triton"),
    pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")])


@pytest.fixture(params=["torch", TRITON])
def backend(request):
    """A JiT op backend: the PyTorch reference, then the fused kernels (interpreted on CPU)."""
    return request.param


@pytest.fixture(autouse=True)
def within_deadline():
    """Skip what would start after JITFAST_TEST_DEADLINE (a Unix time): device_check.sh gives
    the GPU tests a time budget, and a skip says what was not reached."""
    deadline = os.environ.get("JITFAST_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the GPU tests' time budget (JITFAST_TEST_DEADLINE) is spent")


@pytest.fixture(scope="module")
def restore_threads():
    """Training runs set torch's thread count (--cpu-threads 1: tiny steps, a shared CPU); a
    module of them gives it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
