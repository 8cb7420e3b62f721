"""Nothing on a compiled or CUDA-graph-captured path may create a tensor on the host or copy one
to the device (docs/design.md §4): the first GPU run's sampler died at capture on one such tensor.
The CPU cannot show that crash, so these tests run the paths on the `meta` device under a
dispatch mode that fails on every op that takes or returns a CPU tensor."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from jitfast import PMF, Denoiser, JiT
from jitfast.diffusion.pmf_sampler import PMFTimeGrid, integrate_pmf
from jitfast.diffusion.sampling import METHODS, evaluation, integrate, make_time_grid
from jitfast.network.backend import head_kernels
from jitfast.network.model import timestep_embedding

META = torch.device("meta")


def our_frame():
    """The innermost jitfast frame of the current stack, 'file:line function'."""
    for frame in reversed(traceback.extract_stack()):
        if ("/jitfast/" in frame.filename or "/kernels/" in frame.filename) \
                and not frame.filename.endswith("test_capture_safety.py"):
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "outside jitfast"


class NoHostTensors(TorchDispatchMode):
    """Raise on any aten op with a CPU tensor among its inputs or outputs: with the work on
    another device, that is a host tensor created, or one copied to the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs + outputs):
            what = "copies a host tensor" if any(t.device.type == "cpu" for t in inputs) \
                else "creates a host tensor"
            raise AssertionError(f"{func} {what} at {our_frame()}")
        return out


def meta_denoiser(backend):
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=24, depth=2, num_heads=2,
              bottleneck_dim=8, num_classes=5, in_context_len=3, in_context_start=1,
              backend=backend)
    net.check_values = False  # value checks read the device; compiled and captured code skips them
    return Denoiser(net).to(META)


def test_guard_catches_a_host_tensor():
    """The guard itself: today's bug (frequencies made on the host, then moved) is caught."""
    t = torch.rand(3, device=META)
    with pytest.raises(AssertionError, match="creates a host tensor"), NoHostTensors():
        t * torch.arange(3).to(t.device)
    with NoHostTensors():
        t * torch.arange(3, device=t.device)


def test_timestep_embedding_stays_on_the_device():
    t = torch.rand(3, device=META)
    with NoHostTensors():
        assert timestep_embedding(t, 8).device == META


def test_training_forward_and_backward_stay_on_the_device(backend):
    denoiser = meta_denoiser(backend).train()
    x = torch.empty(3, 3, 16, 16, device=META)
    y = torch.zeros(3, dtype=torch.long, device=META)
    with NoHostTensors():
        loss = denoiser.loss(x, y)  # t and noise drawn on the device
        loss.backward()
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)


@pytest.mark.parametrize("method, reverse", [(m, False) for m in METHODS]
                         + [("heun", True), ("unipc3", True)])
@pytest.mark.parametrize("precompute", [True, False])
def test_sampler_trajectory_stays_on_the_device(backend, method, precompute, reverse,
                                                monkeypatch):
    """The whole trajectory as CapturedTrajectory captures it (guided evaluations inside the
    interval, unguided ones outside), with the conditioning precomputed for the run or not,
    sampling or inverting (reverse)."""
    if not precompute:
        monkeypatch.setattr(evaluation, "CONDITIONING_BUDGET", 0)
    denoiser = meta_denoiser(backend).eval()
    z = torch.empty(2, 3, 16, 16, device=META)
    y = torch.zeros(2, dtype=torch.long, device=META)
    time_grid = make_time_grid(denoiser, 4, method, 2.5, (0.3, 0.8), "linear", META, reverse)
    assert any(time_grid.guided) and not all(time_grid.guided)
    with NoHostTensors():
        state = integrate(denoiser, y, z, time_grid, method)
    assert state.shape == z.shape and state.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 2])
def test_pmf_trajectory_stays_on_the_device(backend, steps, dtype):
    """pMF's whole trajectory as PMFSampler captures it (integrate_pmf, guided: omega > 1 on an
    interval), with the update in the head's epilogue on the kernels, for a float32 and a bf16
    network (the state stays float32); the grid and guidance tensors are made before the
    capture, as PMFSampler.run makes them."""
    torch.manual_seed(0)
    net = PMF(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              head_depth=1, bottleneck_dim=8, backend=backend).eval()
    net.check_values = False  # as PMFSampler.run sets it: no host reads in captured work
    net.to(META, dtype)
    z = torch.empty(2, 3, 16, 16, device=META)
    y = torch.zeros(2, dtype=torch.long, device=META)
    grid = PMFTimeGrid.make(steps, META)
    guidance = [torch.full((1,), v, dtype=torch.float32, device=META) for v in (4.0, 0.2, 0.7)]
    assert (head_kernels(net, META) is not None) == (backend == "triton")  # the fused update
    with torch.no_grad(), NoHostTensors():
        state = integrate_pmf(net, y, z, grid, guidance)
        unconditional = net(z, grid.t[0].expand(2), grid.h[0].expand(2),
                            *(g.expand(2) for g in guidance))  # y=None: the null class
    assert state.shape == z.shape and state.dtype == torch.float32
    assert unconditional.shape == z.shape
