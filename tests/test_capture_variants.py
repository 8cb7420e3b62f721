"""Nothing launched inside a CUDA-graph capture may meet a Triton kernel variant for the first
time: compiling and loading a module is not allowed while a stream captures, so such a launch
kills the capture ("operation not permitted when stream is capturing"). Triton compiles one
variant per autotune key and per specialisation of the arguments (16-byte alignment of each
pointer, integers equal to 1 or divisible by 16, the constexprs); a one-element slice of a time
grid, for instance, is aligned only at every fourth index.

A CPU cannot capture, so a subprocess (no TRITON_INTERPRET) runs the real capture code —
``CapturedTrajectory`` and ``GraphedTrainStep`` — with the CUDA stream and graph API replaced by
stand-ins that mark what runs inside the capture, and with every Triton launch recorded, under
Triton's own cache key, instead of compiled and run. The variants launched inside the capture must
all have been launched before it (in the warm-up), and so must their autotune keys.
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests capture for real"),
    pytest.mark.skipif(not triton.__version__.startswith("3."),
                       reason="the recording driver relies on Triton 3 internals")]

# name -> (what runs, batch, dtype): the official and a multistep sampler, guided on an interval,
# at batch 1 (the time scalars are slices of the grid) and at a multiple of 16; the training step;
# pMF's 1- and 2-step sampling as PMFSampler captures it (guided, the update in the head)
SCENARIOS = {f"{what} batch {batch} {dtype}": (what, batch, dtype)
             for what in ("heun-50", "unipc2-cosine-15", "train step", "pmf-1", "pmf-2")
             for batch in (1, 16) for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def recorded():
    """{scenario: {"warm": variants, "captured": variants, "unwarmed": [variant, ...]}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_captured_launches_were_warmed_up(recorded, scenario):
    found = recorded[scenario]
    assert found["captured"] > 0, "the recorder saw no launch inside the capture"
    assert not found["unwarmed"], (
        f"{len(found['unwarmed'])} kernel variant(s) first launched inside the capture:\n"
        + "\n".join(found["unwarmed"][:10]))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_one_capture_on_one_side_stream_in_thread_local_mode(recorded, scenario):
    """In the default "global" mode, an unsafe CUDA call from any thread (the DataLoader's
    pin-memory thread) invalidates the capture; the warm-up steps share one side stream."""
    assert recorded[scenario]["capture modes"] == ["thread_local"]
    assert recorded[scenario]["side streams"] == 1


class Recorder:
    """Each launch's Triton cache key, by phase: "warm" outside the capture, "captured" inside."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.phase = "warm"
        self.seen = {"warm": set(), "captured": set()}
        self.modes, self.streams = [], 0

    def add(self, *variant):
        self.seen[self.phase].add(repr(variant))

    @contextlib.contextmanager
    def capturing(self, graph, capture_error_mode="global", **kwargs):
        self.modes.append(capture_error_mode)
        self.phase = "captured"
        try:
            yield
        finally:
            self.phase = "warm"

    def summary(self):
        unwarmed = sorted(self.seen["captured"] - self.seen["warm"])
        return {"warm": len(self.seen["warm"]), "captured": len(self.seen["captured"]),
                "unwarmed": unwarmed, "capture modes": self.modes, "side streams": self.streams}


def install(recorder):
    """Record Triton launches instead of running them, and stand in for CUDA's streams and
    graphs; CPU tensors go to the (recorded) kernels."""
    from jitfast.kernels import _common, offline

    offline.intercept(90, lambda kernel, args, kwargs: recorder.add(
        "launch", *offline.variant_key(kernel, args, kwargs)),
        on_tune=lambda key: recorder.add("autotune", *key))
    _common.INTERPRET = True  # use_kernel: the kernels, not the PyTorch reference

    class Stream:
        def wait_stream(self, other):
            pass

    def new_stream(*args, **kwargs):
        recorder.streams += 1
        return Stream()

    class Graph:
        def replay(self):
            pass

    torch.cuda.Stream = new_stream
    torch.cuda.current_stream = lambda *a, **k: Stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.CUDAGraph = Graph
    torch.cuda.graph = recorder.capturing


def tiny_denoiser():
    from jitfast import Denoiser, JiT
    torch.manual_seed(0)
    net = JiT(input_size=16, patch_size=4, hidden_size=36, depth=2, num_heads=3,
              bottleneck_dim=8, num_classes=5, in_context_len=3, in_context_start=1,
              backend="triton")
    net.check_values = False  # as in captured work: no host reads
    return Denoiser(net)


def tiny_pmf(dtype):
    from jitfast import PMF
    torch.manual_seed(0)
    net = PMF(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              head_depth=1, bottleneck_dim=8, backend="triton")
    net.check_values = False  # as PMFSampler.run sets it for the capture
    return net.to(getattr(torch, dtype)).eval()


def run_pmf(steps, batch, dtype):
    """What PMFSampler.run does on CUDA: the grid and the guidance tensors made first, then the
    trajectory captured (after its warm-up) and replayed."""
    from functools import partial

    from jitfast.diffusion.pmf_sampler import PMFTimeGrid, captured_pmf
    from jitfast.util.cuda_graphs import CapturedRun

    net = tiny_pmf(dtype)
    y = torch.randint(5, (batch,))
    z = torch.randn(batch, 3, 16, 16)
    grid = PMFTimeGrid.make(steps, z.device)
    guidance = [torch.full((1,), v, dtype=torch.float32) for v in (3.5, 0.2, 0.7)]
    with torch.no_grad():
        CapturedRun(partial(captured_pmf, net, grid, guidance), y, z)(y, z)


def run_scenario(what, batch, dtype):
    from jitfast.diffusion.sampling import CapturedTrajectory, make_time_grid
    from jitfast.training.ema import EMA
    from jitfast.training.optimizer import AdamWEMA
    from jitfast.training.step import GraphedTrainStep

    if what.startswith("pmf-"):
        return run_pmf(int(what.removeprefix("pmf-")), batch, dtype)
    denoiser = tiny_denoiser()
    y = torch.randint(5, (batch,))
    z = torch.randn(batch, 3, 16, 16)
    if what == "train step":
        # bf16 as on the GPU: fp32 weights, the kernels' operands cast by autocast
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
        ema = EMA(denoiser)
        # the trainer's optimizer on one GPU: AdamW, the EMAs and the bf16 compute copies
        optimizer = AdamWEMA(denoiser, 1e-4, ema, copies=dtype == "bfloat16")
        step = GraphedTrainStep(denoiser, denoiser, optimizer, ema)
        t = torch.rand(batch)
        with autocast:
            for _ in range(step.warmup + 2):  # the warm-up steps, the capture, a replay
                step(z.clamp(-1, 1), y, t, torch.randn_like(z))
        return
    denoiser.net.to(getattr(torch, dtype)).eval()
    method, steps, schedule = {"heun-50": ("heun", 50, "linear"),
                               "unipc2-cosine-15": ("unipc2", 15, "cosine")}[what]
    time_grid = make_time_grid(denoiser, steps, method, 2.9, (0.1, 1.0), schedule, z.device)
    with torch.no_grad():
        CapturedTrajectory(denoiser, y, z, time_grid, method)(y, z)


def main():
    recorder, results = Recorder(), {}
    install(recorder)
    for name, scenario in SCENARIOS.items():
        recorder.reset()
        run_scenario(*scenario)
        results[name] = recorder.summary()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
