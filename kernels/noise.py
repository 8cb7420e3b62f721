"""Standard-normal noise for a batch of examples, each drawn from its own seed, in one launch.

Triton's counter-based Philox (``tl.randn(seed, offset)``) keyed by the example's 64-bit seed,
with the element's index within the example as the counter: an example's noise is the same
whatever batch it is drawn in, so a slice of a batch equals its examples drawn alone, and one
process drawing a whole batch equals N processes drawing their shares.

The seeds arrive as an int64 tensor already on the device (``jitfast.training.draws`` builds it in
pinned memory and copies it explicitly): nothing here makes a host tensor or copies one, so the
launch may sit inside a captured region.
"""
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _per_example_randn(SEEDS, OUT, N, BLOCK: tl.constexpr):
    """Program (example, block): N(0, 1) numbers for elements [block·BLOCK, +BLOCK) of the
    example's N, from its seed."""
    example = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(SEEDS + example)
    tl.store(OUT + example * N + offsets, tl.randn(seed, offsets), mask=offsets < N)


@torch.library.custom_op("jitfast::per_example_randn", mutates_args=())
def per_example_randn(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Float32 standard normals (len(seeds), *shape) on the seeds' device; row i depends on
    seeds[i] (int64) alone."""
    n = math.prod(shape)
    out = torch.empty((seeds.shape[0], *shape), device=seeds.device)
    _per_example_randn[(seeds.shape[0], triton.cdiv(n, BLOCK))](seeds, out, n, BLOCK=BLOCK)
    return out


@per_example_randn.register_fake
def _(seeds, shape):
    return seeds.new_empty((seeds.shape[0], *shape), dtype=torch.float32)
