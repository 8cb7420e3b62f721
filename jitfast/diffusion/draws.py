"""Per-example random draws: a function of (seed, step, example) alone, so that a resumed run
repeats an uninterrupted one and N processes sharing a global batch draw what one process with
that batch draws. The noise of example i is drawn from its own seed seed_of(seed, step, i):
  CUDA  one Triton launch (``jitfast.kernels.noise``): Philox keyed by the example's seed;
  CPU   torch's generator seeded with it, one example at a time (the same numbers however
        the examples are split), the examples split over one thread per core (``normal_`` is
        single-threaded and releases the GIL; the draws run between training steps, so every
        core is free for them).
Used by every objective's draws: JiT's (``jitfast.training.draws``) and pMF's
(``jitfast.diffusion.pmf_objective``).
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch


def seed_of(*parts):
    """A 63-bit seed from integers (the hash of a tuple of ints is the same in every process)."""
    return hash(parts) & (2**63 - 1)


def example_noise(seeds, shape, device, out=None):
    """Standard normals (len(seeds), *shape) on `device`, row i drawn from seeds[i] alone;
    written into `out` when given, except by the CUDA kernel (see StepDraws)."""
    if device.type == "cuda":
        kernel = triton_noise()
        if kernel is not None:
            # explicit: a pinned host tensor, then an asynchronous copy (no implicit transfer)
            ids = torch.tensor(seeds, dtype=torch.int64).pin_memory()
            return kernel(ids.to(device, non_blocking=True), shape)
    return generator_noise(seeds, shape, device,
                           len(os.sched_getaffinity(0)) if device.type == "cpu" else 1, out)


def generator_noise(seeds, shape, device, threads=1, out=None):
    """Row i: ``normal_`` of a torch generator on `device` seeded with seeds[i]; the rows are
    split into `threads` contiguous runs drawn in parallel; into `out` when given."""
    if out is None:
        out = torch.empty((len(seeds), *shape), device=device)

    def fill(rows):
        gen = torch.Generator(device)
        for i in rows:
            gen.manual_seed(seeds[i])
            out[i].normal_(generator=gen)

    threads = max(1, min(threads, len(seeds)))
    runs = [range(k * len(seeds) // threads, (k + 1) * len(seeds) // threads)
            for k in range(threads)]
    if threads == 1:
        fill(runs[0])
    else:
        list(thread_pool(threads).map(fill, runs))
    return out


@lru_cache(maxsize=None)
def thread_pool(threads):
    return ThreadPoolExecutor(threads, thread_name_prefix="jitfast-draws")


@lru_cache(maxsize=None)
def triton_noise():
    """The Triton noise kernel, or None (with a warning, once) when Triton cannot be imported."""
    try:
        from jitfast.kernels.noise import per_example_randn
    except ImportError as err:
        warnings.warn(f"Triton cannot be imported ({err}): the training noise is drawn one "
                      f"example at a time with torch generators on the GPU, which is slower and "
                      f"gives other numbers than the Triton kernel (a run resumed without "
                      f"Triton does not repeat one started with it, nor the reverse)")
        return None
    return per_example_randn
