"""Shared test setup. Without a GPU, the Triton kernels run on CPU tensors under Triton's
interpreter; the switch must be set before Triton is first imported, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
