"""Muon for the matrices, Adam for the rest: pMF's optimizer, ``optax.contrib.muon`` as the
official training code calls it (github Lyy-iiis/pMF, utils/trainstate_util.py:
``optax.contrib.muon(learning_rate, adam_b2=0.95)``, every other setting optax's default).

Why not ``torch.optim.Muon`` (with ``torch.optim.Adam`` beside it): it differs from optax's in
three ways that change the run.
- optax orthogonalises each 2-D leaf of the flax tree. jitfast fuses q/k/v and SwiGLU's w1/w3
  into one weight each; orthogonalising the fused matrix is not orthogonalising its parts. Here a
  fused weight's row blocks are orthogonalised one by one (``blocks``).
- optax's Nesterov momentum is bias-corrected: the update orthogonalises
  β·m/(1 − β^(c+1)) + (1 − β)·g/(1 − β^c) at step c, torch's β·m + (1 − β)·g.
- optax's Adam part is Nesterov too (``nesterov=True`` reaches it), which torch's Adam is not.
What matches: the Newton–Schulz iteration (5 steps, coefficients (3.4445, −4.7750, 2.0315), on the
wide orientation, after dividing by the Frobenius norm + ε), the update scale
sqrt(max(1, fan_out/fan_in)), weight decay 0, one learning rate for both parts. The test runs
optax itself (tests/fixtures/muon_optax.pt where it is absent).
Newton–Schulz runs in float32, or in bf16 (``ns_dtype``, a bf16 run's: what a TPU computes for
optax's float32 matmuls at JAX's default precision, and what Muon's authors run; about 2x faster
on a CPU with native bf16 dot products, measured at pMF-T/4's matrices).

The step count and the learning rate may be device tensors (a CUDA-graph step reads them there).
Under FSDP2 each process updates its rows of every parameter; a matrix's orthogonalisation
gathers the whole matrix first (its Nesterov momentum) and keeps its own rows of the result.
"""
import math

import torch
from torch.distributed.tensor import DTensor, Replicate

from jitfast.util.sharded import is_sharded, local

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # optax.contrib.muon's default


def newton_schulz(x, steps=5, eps=1e-8, coefficients=NS_COEFFICIENTS):
    """optax's ``orthogonalize_via_newton_schulz`` of each matrix in the batch `x` (k, m, n)."""
    a, b, c = coefficients
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.transpose(-2, -1)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):  # a·x + (b·G + c·G²)·x, G = x·xᵀ, the scalings in the GEMMs
        gram = x @ x.transpose(-2, -1)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.transpose(-2, -1)


def nesterov_scales(beta, count):
    """(a, b) of optax's bias-corrected Nesterov momentum a·m + b·g at step `count` (a tensor,
    >= 1), m the moment after its update."""
    return beta / (1 - beta ** (count + 1)), (1 - beta) / (1 - beta ** count)


class Muon(torch.optim.Optimizer):
    """`matrices`: (parameter, blocks) pairs, a weight of `blocks` row blocks each orthogonalised
    on its own (q/k/v fused: 3); `others`: the parameters Adam updates. Defaults: the official
    call's (optax's, Adam's b2 0.95 as the configs' adam_b2)."""

    def __init__(self, matrices, others, lr, beta=0.95, ns_steps=5, eps=1e-8, weight_decay=0.0,
                 adam_betas=(0.9, 0.95), coefficients=NS_COEFFICIENTS, ns_dtype=torch.float32):
        matrices = list(matrices)
        for p, blocks in matrices:
            if p.dim() != 2 or p.shape[0] % blocks:
                raise ValueError(f"Muon takes matrices of whole row blocks, got a "
                                 f"{tuple(p.shape)} weight in {blocks} blocks")
        groups = [dict(params=[p for p, _ in matrices], blocks=[b for _, b in matrices],
                       muon=True),
                  dict(params=list(others), muon=False)]
        super().__init__([g for g in groups if g["params"]],
                         dict(lr=lr, beta=beta, ns_steps=ns_steps, eps=eps,
                              weight_decay=weight_decay, adam_betas=tuple(adam_betas),
                              coefficients=tuple(coefficients)))
        self.ns_dtype = ns_dtype  # a setting of the run, not state: not in the state dict

    def _count(self):
        """The step count: one tensor on the parameters' device, shared by every parameter's
        state (the state dict keeps one per parameter, all equal; optax keeps one), made on
        first use."""
        device = self.param_groups[0]["params"][0].device
        for state in self.state.values():
            if "step" in state:
                return state["step"].to(device)
        return torch.zeros((), dtype=torch.float32, device=device)

    def _state(self, p, count, moments):
        state = self.state[p]
        if not state:
            for name in moments:
                state[name] = torch.zeros_like(p)
        state["step"] = count
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # keeps a loaded "step" on the CPU: moved here
        count = self._count()
        for state in self.state.values():
            if "step" in state:
                state["step"] = count

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon takes no closure")
        count = self._count()
        count += 1
        for group in self.param_groups:
            if group["muon"]:
                self.muon_step(group, count)
            else:
                self.adam_step(group, count)

    def muon_step(self, group, count):
        beta, lr = group["beta"], group["lr"]
        a, b = nesterov_scales(beta, count)
        for p, blocks in zip(group["params"], group["blocks"]):
            if p.grad is None:
                continue
            state = self._state(p, count, ("moment",))
            grad = local(p.grad).float()
            moment = local(state["moment"])
            moment.lerp_(grad, 1 - beta)
            rows, cols = p.shape[0] // blocks, p.shape[1]
            nesterov = gathered(moment * a + grad * b, p)  # the whole matrix
            update = newton_schulz(nesterov.view(blocks, rows, cols).to(self.ns_dtype),
                                   group["ns_steps"], group["eps"], group["coefficients"])
            update = update.reshape(p.shape).float()
            update = shard_of(update, p)
            update *= math.sqrt(max(1.0, rows / cols))  # fan_out / fan_in of a block
            if group["weight_decay"]:
                update += group["weight_decay"] * local(p)
            apply(local(p), update, lr)

    def adam_step(self, group, count):
        (b1, b2), lr, eps = group["adam_betas"], group["lr"], group["eps"]
        a, b = nesterov_scales(b1, count)
        second = 1 / (1 - b2 ** count)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state(p, count, ("exp_avg", "exp_avg_sq"))
            grad = local(p.grad).float()
            exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
            exp_avg.lerp_(grad, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (exp_avg * a + grad * b) / ((exp_avg_sq * second).sqrt() + eps)
            apply(local(p), update, lr)


def gathered(rows, like):
    """The whole matrix of which `rows` are this process's part, sharded as `like` (every
    process takes part); `rows` itself where `like` is not sharded. Orthogonalisation needs the
    whole matrix, as optax's Muon sees it."""
    if not is_sharded(like):
        return rows
    return DTensor.from_local(rows, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def shard_of(whole, like):
    """This process's part of a matrix every process holds whole, sharded as `like`."""
    if not is_sharded(like):
        return whole
    replicated = DTensor.from_local(whole, like.device_mesh,
                                    [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


def apply(p, update, lr):
    """p -= lr·update, with lr a float or a device tensor."""
    if torch.is_tensor(lr):
        p.sub_(update * lr)
    else:
        p.add_(update, alpha=-lr)


def linear_matrices(model, fused):
    """(weight, blocks) of every ``nn.Linear`` in `model`, the weights optax's Muon takes in a
    flax model (its Dense kernels: the 2-D leaves; embeddings, convolutions, tokens, norms and
    biases are not); `fused` {module-name part: blocks}, e.g. {".attn.qkv.": 3}: a Linear whose
    name holds a part is that many weights of the flax model, concatenated by rows."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            blocks = next((n for part, n in fused.items() if part in f".{name}."), 1)
            found.append((module.weight, blocks))
    return found


def muon_for(model, lr, fused, **options):
    """``Muon`` over `model`: its Linear weights (``linear_matrices``), Adam for the rest."""
    matrices = linear_matrices(model, fused)
    taken = {id(p) for p, _ in matrices}
    others = [p for p in model.parameters() if id(p) not in taken and p.requires_grad]
    return Muon(matrices, others, lr, **options)
