"""One training step (forward, backward, gradient clipping, AdamW, both EMAs), run eagerly or
replayed from a single CUDA graph.

Eagerly, a JiT-B/16 step is about a thousand kernel launches and the GPU waits on the host
between them. ``GraphedTrainStep`` removes the host from the loop, following PyTorch's
whole-network capture recipe:
- its first calls are ordinary steps on a side stream (they compile, autotune and allocate; they
  train, so nothing is wasted or perturbed); the next call captures the step over static copies
  of its inputs and replays it, and every later call copies its batch in and replays;
- the optimizer is fused AdamW (``make_optimizer`` on CUDA), or on one GPU ``AdamWEMA``
  (jitfast.training.optimizer: AdamW, the EMAs and bf16 compute copies of the weights in one
  pass), which read the step count and the learning rate from device tensors; the lr is set
  with ``set_lr`` outside the graph (a python float would be baked into the capture). Its groups
  are marked capturable at the capture, the flag torch checks there (for the fused kernel it
  changes nothing else); compute copies made stale from outside (a checkpoint loaded) are
  refreshed before each replay, outside the graph;
- gradients are None when capture begins, so the backward allocates them in the graph's pool;
- autocast runs without its weight-cast cache, which would hold tensors across the capture.
Dropout stays exact: each replay draws from the seed and offset of the CUDA generator at that
time, as the eager step would.
"""
from contextlib import nullcontext

import torch

from jitfast.training.muon import Muon
from jitfast.training.optimizer import compute_weights, refresh_compute_weights
from jitfast.util.cuda_graphs import capture, on_side_stream
from jitfast.util.markers import phase


def make_optimizer(params, lr, device, weight_decay=0.0, kind="adamw", fused=None):
    """AdamW with JiT's betas. On CUDA (or wherever fused asks): fused, with the learning rate as
    a device tensor so the step can be captured in a CUDA graph. kind="apex" gives apex's
    FusedAdam (never captured)."""
    if kind == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ImportError("--optimizer apex needs NVIDIA apex (with its CUDA extensions), "
                              "which is not installed; use --optimizer adamw") from None
        return FusedAdam(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                         adam_w_mode=True)
    if not (device.type == "cuda" if fused is None else fused):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=True)
    lr_on_device(optimizer, device)  # after construction: its checks read the value
    return optimizer


def lr_on_device(optimizer, device):
    """For fused AdamW and Muon on CUDA, make every group's learning rate a float32 tensor on
    `device` (again after loading a state dict, which holds floats), keeping its value; others
    are left alone."""
    if not (optimizer.defaults.get("fused") or graphable(optimizer) and device.type == "cuda"):
        return
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def optimizer_state(state):
    """An optimizer state dict with plain-float learning rates, as checkpoints hold them (a
    gathered FSDP state dict is empty on every rank but 0)."""
    groups = [{**g, "lr": float(g["lr"])} for g in state.get("param_groups", ())]
    return {**state, "param_groups": groups} if groups else state


def set_lr(optimizer, lr):
    """Set every group's learning rate: in place into a tensor lr (read by a captured step)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_step(model, denoiser, optimizer, ema, *inputs, clip_grad=0.0, bf16=None):
    """One optimizer step and EMA update of `denoiser` (an objective: JiT's Denoiser, pMF's
    PMFObjective) through `model` (itself, or its DDP wrapper), called with the step's `inputs`
    (the images first); returns the loss, detached, on the device, or where the objective
    returns (loss, extras), the loss and its extras in one vector. No host sync. The forward
    runs under bf16 autocast on CUDA (bf16=None), or as bf16 says; with an ``AdamWEMA``
    optimizer, on its compute copies of the weights, and the optimizer steps the EMA it holds."""
    x = inputs[0]
    enabled = x.is_cuda if bf16 is None else bf16
    autocast = torch.autocast(x.device.type, torch.bfloat16, cache_enabled=False) if enabled \
        else nullcontext()
    with compute_weights(optimizer):
        with phase("forward"), autocast:
            loss = model(*inputs)
        loss, extras = loss if isinstance(loss, tuple) else (loss, None)
        with phase("backward"):
            loss.backward()
        if clip_grad > 0:  # the grads are the compute copies' where the weights are swapped
            with phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(denoiser.parameters(), clip_grad)
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if getattr(optimizer, "ema", None) is not ema:
        with phase("ema"):
            ema.update()
    if extras is None:
        return loss.detach()
    return torch.cat([loss.detach().float().reshape(1), extras.detach().float().reshape(-1)])


class GraphedTrainStep:
    """``train_step`` of fixed (model, denoiser, optimizer, ema, clip_grad), called with a step's
    inputs (JiT's x, y, t, noise; pMF's images, labels and draws): `warmup` eager steps, then one
    CUDA graph captured and replayed for every later step. Every call's tensors must have the
    shapes and dtypes of the first's, and its other inputs (a count) the same values."""

    def __init__(self, model, denoiser, optimizer, ema, clip_grad=0.0, warmup=3, bf16=None):
        if not graphable(optimizer):
            raise ValueError("a graphed training step needs fused AdamW (make_optimizer on "
                             f"CUDA, or AdamWEMA) or Muon, got {type(optimizer).__name__}")
        self.step = lambda *batch: train_step(model, denoiser, optimizer, ema, *batch,
                                              clip_grad=clip_grad, bf16=bf16)
        self.optimizer, self.warmup = optimizer, warmup
        self.side = torch.cuda.Stream() if warmup > 0 else None
        self.graph = self.inputs = self.loss = None

    def __call__(self, *batch):
        if self.inputs is None:
            self.inputs = [b.clone() if torch.is_tensor(b) else b for b in batch]
        else:
            check_like(batch, self.inputs)
        if self.warmup > 0:
            self.warmup -= 1
            return on_side_stream(self.side, lambda: self.step(*batch))
        for static, value in zip(self.inputs, batch):
            if torch.is_tensor(static):
                static.copy_(value, non_blocking=True)
        refresh_compute_weights(self.optimizer)  # outside the graph: it replays the step alone
        if self.graph is None:
            for group in self.optimizer.param_groups:
                group["capturable"] = True
            self.graph, self.loss = capture(lambda: self.step(*self.inputs))
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites self.loss


def graphable(optimizer):
    """Whether a CUDA graph can hold `optimizer`'s step: fused AdamW, or Muon (its step count
    and learning rate on the device, no host sync)."""
    return isinstance(optimizer, Muon) or \
        isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def check_like(batch, reference):
    """Refuse a step's inputs unlike the captured step's: tensors of other shapes or dtypes,
    other values of the rest."""
    if len(batch) != len(reference):
        raise ValueError(f"a graphed training step replays fixed inputs: {len(batch)} given, "
                         f"the captured step took {len(reference)}")
    for i, (value, ref) in enumerate(zip(batch, reference)):
        if not torch.is_tensor(ref):
            if value != ref:
                raise ValueError(f"a graphed training step replays fixed inputs: input {i} is "
                                 f"{value!r}, the captured step took {ref!r}")
        elif value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(f"a graphed training step replays fixed shapes: input {i} is "
                             f"{tuple(value.shape)} {value.dtype}, the captured step took "
                             f"{tuple(ref.shape)} {ref.dtype}")
