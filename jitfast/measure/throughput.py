"""Benchmark arithmetic: analytic JiT and pMF FLOPs (2 per multiply-add; a training step is 3x
the forward), the device's peaks, MFU, bandwidth fractions and speedups, and the run's
environment."""
import platform

import torch

from jitfast.network.pmf import TOKENS, default_bottleneck, official_mlp_hidden
from jitfast.network.presets import preset_config

TRAIN_FACTOR = 3  # forward + backward (two matmuls per forward matmul)
IMAGENET_IMAGES = 1_281_167
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16
# peak HBM bandwidth (GB/s) by the first of these in the device's name, from NVIDIA's datasheets:
# H100 PCIe (HBM2e) 2.0 TB/s, H100 NVL 3.9, H100 SXM5 (HBM3) 3.35, H200 (HBM3e) 4.8
PEAK_HBM_GB_PER_S = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                     ("H200", 4800.0))


def forward_macs(depth, hidden_size, num_heads, bottleneck_dim, in_context_len,
                 in_context_start, patch_size, input_size, in_channels=3, mlp_ratio=4.0):
    """Multiply-adds of one image's forward pass: the matmuls of the patch embedding, every
    block (qkv, attention scores and values, proj, w12, w3, adaLN) and the final layer."""
    D = hidden_size
    patches = (input_size // patch_size) ** 2
    patch_dim = in_channels * patch_size ** 2
    hidden = int(int(D * mlp_ratio) * 2 / 3)
    macs = patches * (patch_dim * bottleneck_dim + bottleneck_dim * D)
    for i in range(depth):
        n = patches + (in_context_len if i >= in_context_start else 0)
        macs += n * (3 * D * D + D * D + 2 * D * hidden + hidden * D)  # qkv, proj, w12, w3
        macs += 2 * n * n * D  # scores q·kᵀ and the weighted sum of values, over all heads
        macs += 6 * D * D  # adaLN
    return macs + patches * D * patch_dim + 2 * D * D  # final Linear and its adaLN


def forward_flops(preset, input_size):
    """FLOPs of one image's forward pass through the preset at `input_size` px."""
    config = preset_config(preset)
    return 2 * forward_macs(input_size=input_size, **config)


def pmf_forward_macs(depth, hidden_size, num_heads, patch_size, input_size, mlp_hidden=None,
                     bottleneck_dim=None, in_channels=3, frequency_size=256, **_):
    """Multiply-adds of one image's forward pass through a PMF (its keywords; mlp_hidden and
    bottleneck_dim default as PMF's do): the patch embedding, the four timestep embedders' MLPs
    (h, omega, t_min, t_max), every block over the 20 prefix and the patch tokens (q/k/v, the
    attention scores and values, out_proj, SwiGLU's w13 and w2) and the final Linear on the
    patch tokens."""
    D = hidden_size
    hidden = mlp_hidden or official_mlp_hidden(D)
    bottleneck = bottleneck_dim or default_bottleneck(D)
    patches = (input_size // patch_size) ** 2
    patch_dim = in_channels * patch_size ** 2
    n = patches + sum(count for _, count in TOKENS)
    macs = patches * (patch_dim * bottleneck + bottleneck * D)
    macs += 4 * (frequency_size * D + D * D)
    macs += depth * (n * (3 * D * D + D * D + 2 * D * hidden + hidden * D) + 2 * n * n * D)
    return macs + patches * D * patch_dim


def pmf_forward_flops(config):
    """FLOPs of one image's forward pass through a PMF of keywords `config` (input_size
    included)."""
    return 2 * pmf_forward_macs(**config)


def peak_tflops(device_name):
    """Dense bf16 peak of the device, or None where MFU is not reported (CPUs, other cards)."""
    return next((peak for chip, peak in PEAK_TFLOPS.items() if chip in device_name), None)


def peak_hbm_gb_per_s(device_name):
    """Peak HBM bandwidth of the device, or None where unknown (CPUs, other cards)."""
    return next((peak for chip, peak in PEAK_HBM_GB_PER_S if chip in device_name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device):
    """Device and library versions, for every benchmark's extra_info."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda if device.type == "cuda" else None)


def throughput(seconds, images, flops, device_name, baseline_seconds=None, traffic=0):
    """images/s, TFLOP/s, MFU, GB/s and the fraction of HBM bandwidth (None without a known
    peak), and speedup over the baseline's time (None without one) of a run that took `seconds`
    for `images` images, `flops` and `traffic` bytes it must read and write."""
    tflops = flops / seconds / 1e12 if flops else None
    gb_per_s = traffic / seconds / 1e9 if traffic else None
    peak, hbm = peak_tflops(device_name), peak_hbm_gb_per_s(device_name)
    return dict(seconds=seconds, images_per_s=images / seconds if images else None,
                tflops=tflops, mfu=tflops / peak if tflops and peak else None,
                gb_per_s=gb_per_s, hbm_fraction=gb_per_s / hbm if gb_per_s and hbm else None,
                speedup=baseline_seconds / seconds if baseline_seconds else None)


def epoch_hours(images_per_s):
    return IMAGENET_IMAGES / images_per_s / 3600


