"""The random draws of a JiT training step: times t, label drops and noise.

Each is a function of (seed, step, example) alone (``jitfast.diffusion.draws``). t and the drop
mask come from one generator seeded by (seed, step) that draws the whole global batch (B numbers
each), sliced to this process's examples; the noise of example i is drawn from its own seed.
"""
import torch

from jitfast.diffusion.draws import example_noise, seed_of


class StepDraws:
    """draws(step, first, count, noise=None) -> (t (count,), noise (count, *shape), drop
    (count,) bool) for the examples [first, first + count) of the global batch at `step`, on
    `device`; on the CPU the noise is written into `noise` when given (a buffer reused from step
    to step: fresh 100-MB host tensors page-fault), on CUDA it comes fresh from the caching
    allocator (copying it into a buffer would only cost bandwidth).

    sample_t(n, device, generator) draws the times (``Denoiser.sample_t``); the noise is drawn
    over every core on the CPU.
    """

    def __init__(self, seed, global_batch, shape, sample_t, label_drop_prob, device):
        self.seed, self.global_batch, self.shape = seed, global_batch, tuple(shape)
        self.sample_t, self.label_drop_prob = sample_t, label_drop_prob
        self.device = torch.device(device)

    def __call__(self, step, first, count, noise=None):
        gen = torch.Generator(self.device).manual_seed(seed_of(self.seed, step))
        t = self.sample_t(self.global_batch, self.device, gen)[first:first + count]
        drop = torch.rand(self.global_batch, device=self.device, generator=gen)
        drop = (drop < self.label_drop_prob)[first:first + count]
        seeds = [seed_of(self.seed, step, i) for i in range(first, first + count)]
        return t, example_noise(seeds, self.shape, self.device, noise), drop
