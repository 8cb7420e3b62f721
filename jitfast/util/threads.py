"""How many CPU threads torch uses."""
import os

import torch


def set_cpu_threads(threads, world):
    """All cores, shared among the `world` processes of this machine (unless told)."""
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // world)
    torch.set_num_threads(threads)
