"""Exponential moving averages of a model's parameters: at constant decays (JiT keeps two, 0.9999
and 0.9996) or EDM-style ones set by a half-life in images (pMF keeps three)."""
from contextlib import contextmanager

import torch

from jitfast.util.sharded import is_sharded

EDM_RAMPUP = 0.05  # the half-life is at most this fraction of the images seen (ema_util.py)


def edm_decay(step, halflife_kimg, batch):
    """The decay of the EMA update after optimizer step `step` (1 for the first) of a run with
    global batch `batch`: pMF's ``edm_schedule`` (github Lyy-iiis/pMF, utils/ema_util.py) with
    the run's batch where it hard-codes 1024. 0.5 ** (batch / h), h = min(half-life, 5% of the
    images seen): one half-life of images halves an old weight's share."""
    halflife = min(halflife_kimg * 1000, step * batch * EDM_RAMPUP)
    return 0.5 ** (batch / max(halflife, 1e-8))


def copy_into(dst, src):
    """dst[i].copy_(src[i]) per tensor: unlike _foreach_copy_, this works on FSDP2's DTensors."""
    for d, s in zip(dst, src):
        d.copy_(s)


class EMA:
    """Copies of `model`'s parameters, one set per decay (or per half-life), updated with
    foreach kernels.

    ``update()`` does ema ← decay·ema + (1 - decay)·param for every set (the official update);
    with ``halflives_kimg`` (and the run's global `batch`) the decays are EDM's (``edm_decay``),
    set for each step by ``at_step(step)`` into device tensors (a CUDA-graph step reads them
    there); ``decays`` is then None;
    ``swapped(k)`` temporarily puts set k (1-based) into the model, e.g. for sampling;
    ``state_dict(k)`` gives the model's state dict with set k's values, the official
    ``model_ema{k}`` entry of a checkpoint.
    """

    def __init__(self, model, decays=(0.9999, 0.9996), halflives_kimg=None, batch=None):
        if halflives_kimg:
            if batch is None or batch < 1 or min(halflives_kimg) <= 0:
                raise ValueError(f"EDM EMAs need positive half-lives and the global batch, got "
                                 f"{list(halflives_kimg)} and {batch}")
            decays = None
        elif not decays or any(not 0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"EMA decays must lie in [0, 1), got {decays}")
        self.model = model
        self.decays = None if decays is None else tuple(decays)
        self.halflives = tuple(halflives_kimg) if halflives_kimg else None
        self.batch = batch
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.sets = len(self.halflives or self.decays)
        self.shadows = [[p.detach().clone() for p in self.params] for _ in range(self.sets)]
        device = self.params[0].device if self.params else "cpu"
        self.weights = [torch.zeros((), device=device) for _ in self.halflives or ()]  # 1 - decay
        self.host_weights = [0.0] * len(self.weights)  # the same, for FSDP2's sharded tensors
        self.sharded = any(is_sharded(p) for p in self.params)

    def at_step(self, step):
        """Set the EDM decays of the update after optimizer step `step` (0 for the first);
        nothing for constant decays."""
        if self.halflives is not None:
            for k, halflife in enumerate(self.halflives):
                self.host_weights[k] = 1.0 - edm_decay(step + 1, halflife, self.batch)
                self.weights[k].fill_(self.host_weights[k])

    @torch.no_grad()
    def update(self):
        """ema + (1 - decay)·(param - ema): one pass over each set (the official mul_ then add_
        takes two; the results differ by float32 rounding)."""
        current = [p.detach() for p in self.params]
        for k, shadow in enumerate(self.shadows):
            if self.decays:
                weight = 1.0 - self.decays[k]
            elif self.sharded:  # a DTensor does not mix with a plain tensor's weight
                weight = self.host_weights[k]
            else:  # read on the device: a CUDA-graph step replays it
                weight = [self.weights[k]] * len(current)
            torch._foreach_lerp_(shadow, current, weight)

    def _index(self, which):
        if not 1 <= which <= self.sets:
            raise ValueError(f"EMA index must be in 1..{self.sets}, got {which}")
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
