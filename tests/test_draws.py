"""The per-step draws of training (t, label drops, noise) and the Triton noise kernel, which runs
on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py) when there is no GPU."""
import importlib.util
import math

import pytest
import torch

from jitfast.diffusion.draws import generator_noise, seed_of
from jitfast.training.draws import StepDraws

SHAPE = (3, 5, 7)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernel under the interpreter
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the noise kernel needs Triton")


def uniform_t(n, device, generator):
    return torch.rand(n, device=device, generator=generator)


def draws(seed=3, batch=7, drop=0.5):
    return StepDraws(seed, batch, SHAPE, uniform_t, drop, "cpu")


def test_cpu_noise_is_each_examples_own_generator_stream():
    """Example i of step s: torch's normal_ from seed_of(seed, s, i), whatever the thread count
    (the numbers CPU runs drew before the draws were threaded)."""
    _, noise, _ = draws()(11, 2, 5)
    for i in range(5):
        gen = torch.Generator().manual_seed(seed_of(3, 11, 2 + i))
        assert torch.equal(noise[i], torch.empty(SHAPE).normal_(generator=gen)), i
    seeds = [seed_of(3, 11, i) for i in range(2, 7)]
    for threads in (2, 3, 8):
        assert torch.equal(generator_noise(seeds, SHAPE, torch.device("cpu"), threads), noise)


def test_a_slice_of_the_global_batch_equals_the_whole_batch_sliced():
    """N processes with global batch B draw what one process draws: rank slices of t, noise and
    drops are those of the whole batch, and t and drops come from the (seed, step) generator."""
    whole = draws()(4, 0, 7)
    part = draws()(4, 2, 3)
    for a, b in zip(part, whole):
        assert torch.equal(a, b[2:5])
    gen = torch.Generator().manual_seed(seed_of(3, 4))
    assert torch.equal(whole[0], torch.rand(7, generator=gen))
    assert torch.equal(whole[2], torch.rand(7, generator=gen) < 0.5)
    assert whole[2].dtype == torch.bool and whole[1].shape == (7, *SHAPE)
    other_step, other_seed = draws()(5, 0, 7), draws(seed=4)(4, 0, 7)
    for other in (other_step, other_seed):
        assert not torch.equal(other[0], whole[0]) and not torch.equal(other[1], whole[1])


@needs_triton
def test_noise_kernel_draws_each_example_from_its_seed_alone():
    from jitfast.kernels.noise import BLOCK, per_example_randn
    shape = (3, 19, 23)  # 1311 numbers per example: two blocks, the second partial
    assert BLOCK < math.prod(shape) < 2 * BLOCK
    seeds = torch.tensor([seed_of(0, 1, i) for i in range(6)] + [5, 5 + 2**40]).to(DEVICE)
    noise = per_example_randn(seeds, shape)
    assert noise.shape == (8, *shape) and noise.dtype == torch.float32
    assert torch.equal(per_example_randn(seeds, shape), noise)  # deterministic
    assert torch.equal(per_example_randn(seeds[2:5], shape), noise[2:5])  # slice invariant
    flat = noise.flatten(1)
    # Every example and block its own: no two rows alike, the second block not the first again;
    # seeds that differ only above bit 32 give other numbers (the whole 64-bit seed is the key).
    assert (flat[:, None] != flat[None]).float().mean((2,)).add(torch.eye(8)).min() > 0.99
    tail = flat.shape[1] - BLOCK
    assert (flat[:, BLOCK:] != flat[:, :tail]).float().mean() > 0.99
    # Standard normal: 10,488 numbers, so the mean is within 0.05 (5 sigma) and the std within
    # 0.05 of 1; uniform, or a wrong Box-Muller scale, would fail both or the ±1 and ±2 masses.
    assert abs(flat.mean()) < 0.05 and abs(flat.std() - 1) < 0.05
    assert abs((flat.abs() < 1).float().mean() - 0.6827) < 0.02
    assert abs((flat.abs() < 2).float().mean() - 0.9545) < 0.01


@needs_triton
def test_noise_kernel_registers_as_a_torch_op():
    from jitfast.kernels.noise import per_example_randn
    torch.library.opcheck(per_example_randn, (torch.tensor([7, 2**62 + 1]).to(DEVICE), [2, 3]))


@pytest.mark.gpu
def test_cuda_draws_are_slice_invariant_and_standard_normal():
    """The trainer's path on CUDA (seeds copied from pinned memory, one Triton launch): a rank's
    slice equals the whole batch sliced."""
    cuda = StepDraws(3, 7, SHAPE, uniform_t, 0.5, "cuda")
    whole, part = cuda(4, 0, 7), cuda(4, 2, 3)
    for a, b in zip(part, whole):
        assert a.is_cuda and torch.equal(a, b[2:5])
    assert abs(whole[1].mean()) < 0.2 and abs(whole[1].std() - 1) < 0.1


def test_noise_into_a_reused_buffer_equals_fresh_noise():
    """The trainer draws each step's noise into one buffer; the numbers are those of a fresh
    draw, and the buffer is what comes back."""
    buffer = torch.full((5, *SHAPE), float("nan"))
    t, noise, drop = draws()(6, 1, 5, buffer)
    fresh_t, fresh, fresh_drop = draws()(6, 1, 5)
    assert noise is buffer and torch.equal(noise, fresh)
    assert torch.equal(t, fresh_t) and torch.equal(drop, fresh_drop)
