"""The optimizer of a single-GPU training run: AdamW, both EMAs and bf16 compute copies of the
matmul weights, updated in one pass per weight (``jitfast.kernels.adamw_ema``).

Under bf16 autocast every forward casts each float32 matmul weight to bf16 and every backward
casts its bf16 grad back, and the EMAs read and write every weight twice more after AdamW. Here
the float32 weights stay the masters (the optimizer's, the checkpoints' and the EMAs'), and the
forward and backward run on bf16 compute copies of the Linear and Conv weights, put in the
modules' place for the step (``ComputeCopies.swapped``): their grads arrive in bf16 on the
copies, and one kernel per weight writes the master, the moments, both EMAs and the copy. The
optimizer's state dict is AdamW's, so checkpoints load either way.

Not for DDP or FSDP (their hooks and shards belong to the module's own parameters): the runs
that use them keep torch's fused AdamW and ``EMA.update``.
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn


def capturing():
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ComputeCopies:
    """bf16 copies of the weights of `model`'s Linear and Conv2d layers: the tensors the forward
    and backward of a training step run on (``swapped``), written by the optimizer's update.
    A master changed by anything else (a checkpoint loaded, an EMA swapped in and out) bumps its
    version counter; its copy is then refreshed before the next step (``refresh_if_stale``,
    outside any CUDA-graph capture)."""

    def __init__(self, model, dtype=torch.bfloat16):
        self.entries, seen = [], set()  # (module, master, copy)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad \
                    and id(module.weight) not in seen:
                seen.add(id(module.weight))
                copy = nn.Parameter(module.weight.detach().to(dtype))
                self.entries.append((module, module.weight, copy))
        self.of = {id(master): copy for _, master, copy in self.entries}
        self.index = {id(master): i for i, (_, master, _) in enumerate(self.entries)}
        self.versions = [master._version for _, master, _ in self.entries]

    def written(self, master):
        """The optimizer wrote master's copy from it (its update bumped master's version)."""
        self.versions[self.index[id(master)]] = master._version

    @torch.no_grad()
    def refresh_if_stale(self):
        """Copy every master changed since its copy was last written."""
        for i, (_, master, copy) in enumerate(self.entries):
            if master._version != self.versions[i]:
                copy.copy_(master)
                self.versions[i] = master._version

    @contextmanager
    def swapped(self):
        """Within the block the modules hold the compute copies in place of their weights."""
        if not capturing():
            self.refresh_if_stale()
        for module, _, copy in self.entries:
            module._parameters["weight"] = copy
        try:
            yield
        finally:
            for module, master, _ in self.entries:
                module._parameters["weight"] = master

    def zero_grad(self):
        for _, _, copy in self.entries:
            copy.grad = None


class AdamWEMA(torch.optim.AdamW):
    """AdamW (JiT's betas) over `model`'s parameters that also steps `ema` (a
    ``jitfast.training.ema.EMA`` of the same model, at most two sets) and writes the compute
    copies (``ComputeCopies``, unless copies=False), one kernel per weight. ``train_step`` skips
    ``ema.update()`` for the EMA an optimizer holds. The learning rate may be a device tensor
    (``lr_on_device``), as a CUDA-graph step needs."""

    def __init__(self, model, lr, ema, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 copies=True):
        if ema.decays is None or len(ema.decays) > 2:
            raise ValueError(f"AdamWEMA steps at most two EMA sets of constant decays, got "
                             f"{ema.decays or ema.halflives}")
        super().__init__(model.parameters(), lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, fused=True)
        from jitfast.kernels.adamw_ema import adamw_ema_  # Triton: only where it runs
        self.update = adamw_ema_
        self.ema = ema
        self.copies = ComputeCopies(model) if copies else None
        self.shadows = {id(p): [shadow[i] for shadow in ema.shadows]
                        for i, p in enumerate(ema.params)}

    def swapped(self):
        """``ComputeCopies.swapped`` of the copies, or nothing to swap."""
        return nullcontext() if self.copies is None else self.copies.swapped()

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        if self.copies is not None:
            self.copies.zero_grad()

    def _shared_step(self):
        """The step count: one device tensor, shared by every parameter's state (AdamW's state
        dict keeps one per parameter; they are equal), made on first use."""
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return self.state[p]["step"]
        return torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)

    def _state(self, p, step):
        """p's state, made (zero moments) on its first step."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = step
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        step = self._shared_step()
        for state in self.state.values():
            if "step" in state:
                state["step"] = step

    def scalars(self, group, step):
        """(lr, 1/(1 - β1^step), 1/sqrt(1 - β2^step)) of a group, on the device."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if not torch.is_tensor(lr):
            lr = torch.full((), lr, dtype=torch.float32, device=step.device)
        return torch.stack([lr.reshape(()).float(), 1 / (1 - torch.pow(beta1, step)),
                            torch.rsqrt(1 - torch.pow(beta2, step))])

    @torch.no_grad()
    def step(self, closure=None):
        """The weights with compute copies: one ``adamw_ema_`` kernel each. The rest (biases,
        norm weights, embeddings: small, many, without copies): torch's multi-tensor fused
        AdamW and one lerp per EMA set, a few launches for all of them."""
        if closure is not None:
            raise ValueError("AdamWEMA takes no closure")
        step = self._shared_step()
        step += 1
        decays = self.ema.decays
        for group in self.param_groups:
            scalars, rest = self.scalars(group, step), []
            for p in group["params"]:
                copy = None if self.copies is None else self.copies.of.get(id(p))
                grad = p.grad if copy is None else copy.grad
                if grad is None:
                    continue
                state = self._state(p, step)
                if copy is None:
                    rest.append((p, grad, state))
                    continue
                self.update(p, grad, state["exp_avg"], state["exp_avg_sq"], scalars,
                            group["betas"], group["eps"], group["weight_decay"],
                            self.shadows.get(id(p), ()), decays, copy)
                self.copies.written(p)
            if rest:
                self.multi_tensor_step(group, rest, step)

    def multi_tensor_step(self, group, rest, step):
        """AdamW and the EMAs of (param, grad, state) triples in torch's multi-tensor kernels."""
        params, grads, states = zip(*rest)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(list(params), list(grads), [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], [step] * len(params),
                            lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"],
                            amsgrad=False, maximize=False)
        for k, decay in enumerate(self.ema.decays):
            shadows = [self.shadows[id(p)][k] for p in params]
            torch._foreach_lerp_(shadows, list(params), 1.0 - decay)


def compute_weights(optimizer):
    """The context a training step's forward and backward run in: the optimizer's compute
    copies swapped in (``AdamWEMA``), or nothing."""
    swapped = getattr(optimizer, "swapped", None)
    return swapped() if swapped is not None else nullcontext()


def refresh_compute_weights(optimizer):
    """Bring the optimizer's compute copies up to date with their masters, if it has any: before
    a CUDA graph captures or replays a step (the step itself does it when run eagerly)."""
    copies = getattr(optimizer, "copies", None)
    if copies is not None:
        copies.refresh_if_stale()
