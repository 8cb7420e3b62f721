"""Exponential moving averages of a model's parameters (JiT keeps two: 0.9999 and 0.9996)."""
from contextlib import contextmanager

import torch


def copy_into(dst, src):
    """dst[i].copy_(src[i]) per tensor: unlike _foreach_copy_, this works on FSDP2's DTensors."""
    for d, s in zip(dst, src):
        d.copy_(s)


class EMA:
    """Copies of `model`'s parameters, one set per decay, updated with foreach kernels.

    ``update()`` does ema ← decay·ema + (1 - decay)·param for every set (the official update);
    ``swapped(k)`` temporarily puts set k (1-based) into the model, e.g. for sampling;
    ``state_dict(k)`` gives the model's state dict with set k's values, the official
    ``model_ema{k}`` entry of a checkpoint.
    """

    def __init__(self, model, decays=(0.9999, 0.9996)):
        for decay in decays:
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"EMA decays must lie in [0, 1), got {decay}")
        self.model = model
        self.decays = tuple(decays)
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadows = [[p.detach().clone() for p in self.params] for _ in self.decays]

    @torch.no_grad()
    def update(self):
        """ema + (1 - decay)·(param - ema): one pass over each set (the official mul_ then add_
        takes two; the results differ by float32 rounding)."""
        current = [p.detach() for p in self.params]
        for decay, shadow in zip(self.decays, self.shadows):
            torch._foreach_lerp_(shadow, current, 1.0 - decay)

    def _index(self, which):
        if not 1 <= which <= len(self.decays):
            raise ValueError(f"EMA index must be in 1..{len(self.decays)}, got {which}")
        return which - 1

    @contextmanager
    def swapped(self, which=1):
        """Within the block the model holds EMA set `which`; its own weights come back after."""
        shadow = self.shadows[self._index(which)]
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            copy_into([p.detach() for p in self.params], shadow)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                copy_into([p.detach() for p in self.params], backup)

    def state_dict(self, which=1):
        """The model's state dict with EMA set `which` in place of the parameters."""
        state = self.model.state_dict()
        for name, value in zip(self.names, self.shadows[self._index(which)]):
            state[name] = value.detach().clone()
        return state

    @torch.no_grad()
    def network(self, net, which=1, dtype=torch.bfloat16):
        """A new network like `net` (a JiT or PMF inside the EMA's model, with its ``config``
        and ``backend``) holding EMA set `which`'s weights in `dtype`, on their device: a sampler
        of it runs in that dtype with no weight cast in any of its evaluations (the training
        grid), and leaves the model and the EMA untouched."""
        prefix = next((name + "." for name, module in self.model.named_modules()
                       if module is net and name), "")
        state = {k[len(prefix):]: v for k, v in self.state_dict(which).items()
                 if k.startswith(prefix)}
        device = self.shadows[self._index(which)][0].device
        with torch.device(device):
            copy = type(net)(**net.config, backend=net.backend)
        copy.load_state_dict(state)
        return copy.to(dtype)

    @torch.no_grad()
    def load_state_dict(self, state, which=1):
        """Set EMA set `which` from a state dict with the model's parameter names."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state dict lacks parameters: {', '.join(missing)}")
        shadow = self.shadows[self._index(which)]
        copy_into(shadow, [state[name].to(s.device, s.dtype)
                           for name, s in zip(self.names, shadow)])
