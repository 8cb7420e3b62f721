"""The CPU as torch uses it: how many threads, whether it has bf16 dot products."""
import os

import torch


def set_cpu_threads(threads, world):
    """All cores, shared among the `world` processes of this machine (unless told)."""
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // world)
    torch.set_num_threads(threads)


def native_bf16():
    """Whether this CPU has bf16 dot-product instructions (x86's avx512_bf16 or AMX: oneDNN's
    bf16 matmuls there run about 2x its float32 ones), from Linux's /proc/cpuinfo; None where
    that file is not to be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})
