"""Shared benchmark setup: the device, the per-device repeats, the run order, and the `measure`
fixture that times a function with pytest-benchmark and records throughput, MFU and the speedup
over its group's baseline in ``extra_info``.

Run with ``pytest benchmarks/ --benchmark-only`` (CPU: small presets, PyTorch paths only; CUDA:
the JiT presets in bf16 and the Triton kernels). ``JITFAST_BENCH_DEADLINE`` (a Unix time) skips
the benchmarks that would start after it, so a time-boxed run still writes its JSON;
``JITFAST_BENCH_PLAN`` (a file) picks and orders the benchmarks (benchmarks/gpu_plan.txt);
``JITFAST_BENCH_LOG`` (a file) gets each result appended as one JSON line the moment it is
measured, so that a run killed before pytest-benchmark writes its JSON at the session's end keeps
every finished number (``python -m jitfast.bench report`` reads either file).
"""
import gc
import itertools
import json
import os
import re
import time

import pytest
import torch

from jitfast.measure.throughput import environment, throughput
from jitfast.util.files import append_line
from jitfast.util.threads import set_cpu_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
ENV = environment(DEVICE)
if not ON_CUDA:
    set_cpu_threads(None, 1)  # all cores but one, as training does: a busy core stalls them all
# the dtype activations run in: bf16 autocast on CUDA, float32 on the CPU
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
# pytest-benchmark's pedantic settings: (rounds, iterations per round, warm-up rounds)
REPEATS = {"kernel": (20, 10, 3), "train": (10, 1, 3), "sample": (3, 1, 1), "data": (5, 1, 1),
           "forward": (5, 1, 1)} \
    if ON_CUDA else {"kernel": (10, 5, 2), "train": (5, 1, 2), "sample": (3, 1, 1),
                     "data": (3, 1, 1), "forward": (3, 1, 1)}
# files in the order a time-boxed run should measure them: the headline numbers first
FILE_ORDER = ("train", "sampling", "kernels", "forward", "data")

baselines = {}  # group -> median seconds of its baseline, measured earlier in this session


def skip_unless_cuda(variant):
    """Skip a variant that only exists on CUDA (Triton kernels, CUDA graphs) on other devices."""
    if not ON_CUDA:
        pytest.skip(f"{variant} runs on CUDA only; this run is on the CPU")


def read_plan(path):
    """The patterns of a plan file: benchmark ids (the part after '::'), '*' matching any text,
    one a line, '#' starting a comment."""
    with open(path) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [re.compile(".*".join(map(re.escape, line.split("*"))) + "$")
                for line in lines if line]


def pytest_collection_modifyitems(config, items):
    """With JITFAST_BENCH_PLAN (a plan file, see read_plan): only the planned benchmarks, in the
    order of the first pattern each matches. Otherwise: compiled variants last (their compiles
    take most of a GPU run's time), then by FILE_ORDER; the sort is stable, so each group's
    baseline (eager, never compiled) still comes first."""
    plan = os.environ.get("JITFAST_BENCH_PLAN")
    if plan:
        patterns = read_plan(plan)

        def position(item):
            name = item.nodeid.split("::", 1)[-1]
            return next((i for i, p in enumerate(patterns) if p.match(name)), None)
        config.hook.pytest_deselected(items=[i for i in items if position(i) is None])
        items[:] = sorted((i for i in items if position(i) is not None), key=position)
        return

    def rank(item):
        variant = item.callspec.params.get("variant", "") if hasattr(item, "callspec") else ""
        file = next((i for i, key in enumerate(FILE_ORDER) if key in item.path.stem),
                    len(FILE_ORDER))
        return "compile" in variant, file
    items.sort(key=rank)


@pytest.fixture(autouse=True)
def within_deadline():
    """Skip what would start after JITFAST_BENCH_DEADLINE (set by device_check.sh)."""
    deadline = os.environ.get("JITFAST_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the benchmark time budget (JITFAST_BENCH_DEADLINE) is spent")


@pytest.fixture(autouse=True)
def fresh_start():
    """Each benchmark compiles from scratch (no recompile limits or dynamic shapes carried over
    from earlier models and shapes) and finds the device memory of earlier ones released."""
    torch._dynamo.reset()
    gc.collect()
    if ON_CUDA:
        torch.cuda.empty_cache()


def synced(fn, every):
    """fn, followed by a CUDA synchronize on every `every`-th call: pytest-benchmark times
    `every` calls per round, so each round ends when the device has finished them."""
    if not ON_CUDA:
        return fn
    calls = itertools.count(1)

    def run():
        fn()
        if next(calls) % every == 0:
            torch.cuda.synchronize()
    return run


@pytest.fixture
def measure(benchmark):
    """measure(fn, group, kind, variant, baseline, images, flops, traffic, **info): time fn()
    with the kind's repeats and record extra_info. `baseline` marks the variant whose median
    the later variants of the same group are compared to; images, flops and traffic (the bytes
    it must read and write) are per call."""
    def run(fn, group, kind, variant, baseline, images=0, flops=0, traffic=0, **info):
        benchmark.group = group
        rounds, iterations, warmup = REPEATS[kind]
        if ON_CUDA:
            torch.cuda.synchronize()
        benchmark.pedantic(synced(fn, iterations), rounds=rounds, iterations=iterations,
                           warmup_rounds=warmup)
        if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
            return
        median = benchmark.stats.stats.median
        if baseline:
            baselines[benchmark.group] = median
        benchmark.extra_info.update(
            {**ENV, "kind": kind, "variant": variant, "dtype": str(DTYPE).removeprefix("torch."),
             **info},
            **throughput(median, images, flops, ENV["device"], baselines.get(benchmark.group),
                         traffic))
        log_result(benchmark)
    return run


def log_result(benchmark):
    """Append the result to JITFAST_BENCH_LOG, if set, as a line of pytest-benchmark's JSON."""
    path = os.environ.get("JITFAST_BENCH_LOG")
    if not path:
        return
    line = json.dumps({"name": benchmark.name, "fullname": benchmark.fullname,
                       "group": benchmark.group, "stats": benchmark.stats.stats.as_dict(),
                       "extra_info": benchmark.extra_info})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append_line(fd, line, path)
    finally:
        os.close(fd)
