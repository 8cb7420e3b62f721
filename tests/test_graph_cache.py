"""The bound on the sampler's CUDA graphs (one per batch size, settings and weights): the least
recently used go first, a hit replays without a capture, free_graphs drops them all. On the CPU
the capture is a fake and the labels only claim to be on CUDA."""
import pytest
import torch

from jitfast.diffusion.sampling import GraphCache, trajectory
from jitfast.experiments.gaussian import gaussian_denoiser


def test_least_recently_used_goes_first():
    made = []

    def make(key):
        made.append(key)
        return f"graph {key}"
    cache = GraphCache(size=2)
    for key in "abac":  # c evicts b: a was used after it
        assert cache.get(key, lambda: make(key)) == f"graph {key}"
    assert made == ["a", "b", "c"] and list(cache.entries) == ["a", "c"]
    cache.get("b", lambda: make("b"))
    assert made == ["a", "b", "c", "b"] and list(cache.entries) == ["c", "b"]
    cache.size = 1  # shrinking drops the oldest at once
    assert list(cache.entries) == ["b"]
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="size >= 1"):
        GraphCache(size=0)


class CudaLooking(torch.Tensor):
    """Labels that pass the sampler's check for CUDA graphs; they stay on the CPU."""
    is_cuda = True


def test_generate_keeps_the_most_recent_graphs(monkeypatch):
    captured = []

    class FakeCapture:
        def __init__(self, denoiser, y, z, time_grid, method):
            captured.append((y.shape[0], method, len(time_grid.t) - 1))

        def __call__(self, y, z):
            return z.clone()
    monkeypatch.setattr(trajectory, "CapturedTrajectory", FakeCapture)
    denoiser = gaussian_denoiser()
    assert denoiser.max_graphs == 8
    denoiser.max_graphs = 2

    def sample(batch, steps=3):
        y = torch.zeros(batch, dtype=torch.long).as_subclass(CudaLooking)
        return denoiser.generate(y, steps, "euler", cuda_graphs=True)

    for batch in (1, 2, 1):
        sample(batch)
    assert captured == [(1, "euler", 3), (2, "euler", 3)]  # the second batch 1 replays
    sample(3)  # evicts batch 2, the least recently used
    sample(1)
    assert captured[2:] == [(3, "euler", 3)]
    sample(1, steps=4)  # new settings: evicts batch 3
    sample(3)
    assert captured[3:] == [(1, "euler", 4), (3, "euler", 3)]
    assert [key[:2] for key in denoiser.graph_cache.entries] == [(1, 4), (3, 3)]
    denoiser.free_graphs()
    assert len(denoiser.graph_cache) == 0
    sample(1)
    assert captured[5:] == [(1, "euler", 3)]
