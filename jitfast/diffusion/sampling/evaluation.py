"""One network evaluation of the sampler: the (guided) velocity at a state, and the state update
fused into it, with the run's conditioning precomputed. Tensor-only, so it can be captured."""
import torch

from jitfast.functional.ode import ode_update
from jitfast.network.backend import head_kernels


def network_inputs(denoiser, y, z, t, guided, cond=None):
    """The network's (z, t, y) for an evaluation at float32 state z, time t (a (1,) tensor): the
    batch, or when guided the conditional batch then its unconditional (null-class) copy. With
    the run's conditioning rows `cond` the network reads no labels (y is None): their rows were
    made once for the whole trajectory."""
    if guided:
        z = torch.cat([z, z])
        if cond is None:
            y = torch.cat([y, torch.full_like(y, denoiser.num_classes)])
    return (z.to(next(denoiser.net.parameters()).dtype), t.expand(z.shape[0]),
            None if cond is not None else y)


def network_velocity(denoiser, y, z, t, w, guided, cond=None):
    """The velocity at float32 state z (B, C, H, W), time t (a (1,) float32 tensor).

    Unguided: one conditional pass. Guided: cond and uncond as one batched forward, combined as
    v_u + w·(v_c - v_u).
    """
    extra = {} if cond is None else {"cond": cond}
    out = denoiser.net(*network_inputs(denoiser, y, z, t, guided, cond), **extra).float()
    t = t.expand(z.shape[0])
    if not guided:
        return denoiser.velocity(out, z, t)
    v_cond, v_uncond = (denoiser.velocity(half, z, t) for half in out.chunk(2))
    return v_uncond + w * (v_cond - v_uncond)


def network_step(denoiser, y, z, t, w, guided, dt, v_prev=None, base=None, cond=None):
    """One network evaluation of the velocity at float32 state z, time t, guidance weight w, and
    the ODE state it leads to: ``ode_update(v, z, dt, v_prev, base)``, t, w and dt being (1,)
    float32 tensors; cond, the network's precomputed conditioning rows (``JiT.conditioning``).
    With dt = max(1 - t, t_eps), the "state" is the (guided) x-prediction z + c(t)·v.

    For a JiT on the Triton kernels with x-prediction, the output head computes both in its
    epilogue (``jitfast.kernels.output_head_step``), guidance included.
    """
    net = denoiser.net
    kernels = head_kernels(net, z.device)
    if kernels is None or denoiser.pred != "x":
        v = network_velocity(denoiser, y, z, t, w, guided, cond)
        return ode_update(v, z, dt, v_prev, base)

    def head(u, weight, bias):
        return kernels.output_head_step(u, weight, bias, z, t, dt, net.patch_size,
                                        denoiser.t_eps, w if guided else None, v_prev, base)
    return net(*network_inputs(denoiser, y, z, t, guided, cond), head=head, cond=cond)


CONDITIONING_BUDGET = 256 * 2**20  # bytes of conditioning precomputed for a whole trajectory


def trajectory_conditioning(denoiser, y, time_grid):
    """rows(k, guided): the network's conditioning of the evaluation at grid time k, taken from
    one batch computed for every (grid time, label) pair of the run — the labels y, then when
    guidance is on anywhere the null class for each example. rows(...) is None throughout (the
    network computes its own) when the network has no ``conditioning``, when its weights are
    FSDP shards (gathered only inside its forward), or when the batch would take more than
    CONDITIONING_BUDGET (large batches, whose per-evaluation matmuls run efficiently)."""
    net = denoiser.net
    B = y.shape[0]
    null = torch.full_like(y, denoiser.num_classes)
    labels = torch.cat([y, null]) if any(time_grid.guided) else y
    times = len(time_grid.t) - 1  # the grid's last time is never evaluated
    if not hasattr(net, "conditioning") or sharded(net):
        return lambda k, guided: None
    # per row: the in-context tokens, c, each block's six adaLN vectors and the final layer's two
    width = net.hidden_size * (net.in_context_len + 1 + 6 * len(net.blocks) + 2)
    if times * len(labels) * width * next(net.parameters()).element_size() > CONDITIONING_BUDGET:
        return lambda k, guided: None
    cond = net.conditioning(time_grid.t[:times].repeat_interleave(len(labels)),
                            labels.repeat(times))
    return lambda k, guided: cond.rows(slice(k * len(labels), k * len(labels) + B * (1 + guided)))


def sharded(module):
    """Whether the module's weights are distributed tensors (FSDP2 shards)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())
