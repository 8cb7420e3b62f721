"""Attention for the transformer core, with the backend chosen in one place.

Order of preference: flash-attn (3, then 2) when importable and the inputs are CUDA fp16/bf16;
else PyTorch SDPA, its backend pinned explicitly on CUDA (flash, memory-efficient or cuDNN: never
the unfused math path); on other devices SDPA's own dispatch, which on the CPU is a fused kernel
faster than its math path, in float32 there when gradients flow (its bf16 backward is about 2x
slower than its float32 one on a Zen 4 CPU with native bf16 dot products, measured at pMF-T/4's
shapes; the forward takes the same time in either). ``scores_fp32=True`` computes q·kᵀ and the
softmax in float32 as the official code does (its authors saw loss spikes for e/v-prediction
without it).
"""
import importlib
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]


def find_flash_attn():
    """flash-attn's (B, N, H, hd) entry points that are importable: {"fa3": f, "fa2": f}."""
    found = {}
    for key, module in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        try:
            found[key] = importlib.import_module(module).flash_attn_func
        except ImportError:
            continue
    return found


FLASH_ATTN = find_flash_attn()  # once, at import: compiled code reads a plain dict
# whether CPU tensors take the CPU's float32 SDPA where gradients flow (see above); off while a
# trace prices a CUDA step on fake CPU tensors (``as_on_cuda``)
CPU_FLOAT32_BACKWARD = {"on": True}


@contextmanager
def as_on_cuda():
    """Attention on CPU tensors as on CUDA's: bf16 inputs stay bf16 (jitfast.measure.traced)."""
    CPU_FLOAT32_BACKWARD["on"] = False
    try:
        yield
    finally:
        CPU_FLOAT32_BACKWARD["on"] = True


def attention_backend(device, dtype, dropout_p=0.0, scores_fp32=False):
    """Name of the backend `attention` uses for such inputs: fa3 | fa2 | sdpa-pinned (CUDA) |
    sdpa (SDPA's own dispatch) | fp32."""
    if scores_fp32:
        return "fp32"
    if device.type != "cuda":
        return "sdpa"
    if dtype in (torch.float16, torch.bfloat16):
        if "fa3" in FLASH_ATTN and dropout_p == 0.0:  # FA3 has no dropout
            return "fa3"
        if "fa2" in FLASH_ATTN:
            return "fa2"
    return "sdpa-pinned"


def attention_fp32(q, k, v, dropout_p=0.0):
    """softmax(q kᵀ/√hd) v with the scores and softmax in float32 (the official computation)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    weights = F.dropout(scores.softmax(dim=-1), dropout_p)
    return (weights @ v.float()).to(v.dtype)


def attention(q, k, v, dropout_p=0.0, scores_fp32=False):
    """Multi-head attention on (B, H, N, hd) tensors; returns (B, H, N, hd)."""
    backend = attention_backend(v.device, v.dtype, dropout_p, scores_fp32)
    if backend == "fp32":
        return attention_fp32(q, k, v, dropout_p)
    q, k = q.to(v.dtype), k.to(v.dtype)
    if backend in ("fa3", "fa2"):
        extra = {"dropout_p": dropout_p} if backend == "fa2" else {}
        out = FLASH_ATTN[backend](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  **extra)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    if backend == "sdpa-pinned":
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if v.device.type == "cpu" and v.dtype != torch.float32 and CPU_FLOAT32_BACKWARD["on"] and \
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 dropout_p=dropout_p)
        return out.to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
