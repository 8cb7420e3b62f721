"""CUDA-graph sampling on a GPU (run with `pytest -m gpu` on the device machine)."""
import pytest
import torch

from jitfast import Denoiser, JiT_models

pytestmark = pytest.mark.gpu


def denoiser(dtype, backend="auto"):
    torch.manual_seed(0)
    net = JiT_models["JiT-B/16"](input_size=64, num_classes=10, backend=backend).cuda().eval()
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return Denoiser(net.to(dtype))


METHODS = [("heun", "linear"), ("unipc2", "lambda"), ("dpm3m", "linear")]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("method, schedule", METHODS)
def test_graph_replay_equals_eager(dtype, tolerance, batch, method, schedule):
    d = denoiser(dtype)
    y = torch.arange(batch, device="cuda") % 10
    z0 = torch.randn(batch, 3, 64, 64, device="cuda",
                     generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(steps=6, method=method, cfg=2.5, interval=(0.1, 1.0), z0=z0, schedule=schedule)
    eager = d.generate(y, cuda_graphs=False, **kwargs)
    graphed = d.generate(y, cuda_graphs=True, **kwargs)
    again = d.generate(y, cuda_graphs=True, **kwargs)  # replays the cached graphs
    assert graphed.dtype == torch.float32
    assert torch.equal(graphed, again)
    assert ((graphed - eager).norm() / eager.norm()).item() < tolerance
    assert len(d.graph_cache) == 1  # the whole trajectory, captured once


@pytest.mark.parametrize("method, schedule", METHODS)
def test_fused_graphed_sampler_equals_torch_backend(method, schedule):
    """Velocity, guidance and Euler/Heun update (or the x-prediction of the exponential
    methods) in the head's epilogue (backend "auto" is the kernels here), replayed from CUDA
    graphs, against the unfused torch backend in float32."""
    y = torch.arange(3, device="cuda")
    z0 = torch.randn(3, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(steps=4, method=method, cfg=2.5, interval=(0.1, 0.9), z0=z0,
                  schedule=schedule)
    fused = denoiser(torch.float32).generate(y, cuda_graphs=True, **kwargs)
    want = denoiser(torch.float32, "torch").generate(y, cuda_graphs=False, **kwargs)
    assert ((fused - want).norm() / want.norm()).item() < 1e-5


def test_graphs_under_autocast_follow_weights_changed_in_place():
    """A float32 network under bf16 autocast (as the trainer samples with EMA weights swapped
    in): the captured trajectory casts the weights it reads at every replay, so a second run
    after an in-place change of the weights equals an eager run, in a new autocast region."""
    d = denoiser(torch.float32)
    y = torch.arange(2, device="cuda")
    z0 = torch.randn(2, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kwargs = dict(steps=4, cfg=2.0, interval=(0.2, 0.9), z0=z0)
    with torch.autocast("cuda", torch.bfloat16):
        first = d.generate(y, cuda_graphs=True, **kwargs)
    with torch.no_grad():
        for p in d.net.parameters():
            p.mul_(0.9)
    with torch.autocast("cuda", torch.bfloat16):
        graphed = d.generate(y, cuda_graphs=True, **kwargs)
        eager = d.generate(y, cuda_graphs=False, **kwargs)
    assert len(d.graph_cache) == 1 and not torch.allclose(graphed, first)
    assert ((graphed - eager).norm() / eager.norm()).item() < 2e-2


def test_graph_cache_is_bounded_and_free_graphs_returns_the_memory():
    """The least recently used graph goes when the cache is full; free_graphs drops the rest and
    hands their memory pools back to the device."""
    d = denoiser(torch.float32)
    d.max_graphs = 1
    for batch in (1, 2):
        d.generate(torch.arange(batch, device="cuda"), steps=2, cuda_graphs=True)
    assert [key[0] for key in d.graph_cache.entries] == [2]
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    d.free_graphs()
    assert len(d.graph_cache) == 0 and torch.cuda.memory_reserved() < reserved
