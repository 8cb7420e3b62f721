"""The dispatch trace (jitfast.measure.trace) and its roofline: calibrated against what the H200
measured, its accounting checked against closed forms, its lines and phases where they belong."""
import json
import math
from pathlib import Path

import pytest
import torch

from jitfast.measure.roofline import H200, MODELLED, PROFILE, PROFILED_STEP, compare, fit
from jitfast.measure.trace import CHUNK, Trace, fake_tensors, record

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "trace_jit_b16_step_e8a6fb2.json"


def profiled_groups():
    with open(ROOT / PROFILE) as f:
        return {p["name"]: p["groups"] for p in json.load(f)["profiles"]}[PROFILED_STEP]


def profiled_trace():
    """The trace of the step the H200 profiled (JiT-B/16, batch 128), recorded from the code of
    that run (tests/fixtures/README.md), priced on today's H200 roofline."""
    with open(FIXTURE) as f:
        return Trace.from_dict(json.load(f), H200)


def test_roofline_reproduces_the_profiled_step():
    """Every group the roofline models from bytes and FLOPs alone lies within 10% of the H200's
    profile of the same step."""
    rows = {g: (measured, modelled, error)
            for g, measured, modelled, error, _ in compare(profiled_trace().groups(),
                                                           profiled_groups())}
    assert set(MODELLED) <= set(rows)
    off = {g: f"{rows[g][1]:.3f} ms modelled vs {rows[g][0]:.3f} measured ({rows[g][2]:+.1%})"
           for g in MODELLED if abs(rows[g][2]) > 0.10}
    assert not off, off


def test_h200_constants_are_the_fit_to_the_profile():
    """The constants in use are those fitted to the profile (not typed in): within 3%."""
    fitted = fit(profiled_trace().groups(), profiled_groups(), H200)
    for name in ("bandwidth", "matmul", "attention", "triton_dot"):
        assert getattr(H200, name) == pytest.approx(getattr(fitted, name), rel=0.03), name


def traced(work):
    with fake_tensors():
        return record(work, "test")


def test_a_matmul_moves_its_operands_and_does_2mkn_flops():
    M, K, N = 37, 53, 29
    with fake_tensors():
        a, b = torch.empty(M, K), torch.empty(K, N)
        trace = record(lambda: (a @ b.t().t()).t(), "mm")  # the transposes are views
    (launch,) = trace.launches
    assert (launch.op, launch.group, launch.kernels) == ("aten::mm", "GEMM", 1)
    assert launch.flops == 2 * M * K * N
    assert launch.bytes == 4 * (M * K + K * N + M * N)
    assert launch.seconds == pytest.approx(H200.launch + max(launch.bytes / H200.bandwidth,
                                                             launch.flops / H200.matmul))


def test_in_place_and_broadcast_bytes():
    """add_ reads both operands and writes its output; a broadcast operand is read once;
    fill_ only writes."""
    with fake_tensors():
        x, row = torch.empty(41, 17), torch.empty(17)
        trace = record(lambda: (x.add_(row), x.fill_(0.0)), "in place")
    add, fill = trace.launches
    assert add.bytes == 4 * (41 * 17 + 17 + 41 * 17)
    assert fill.bytes == 4 * 41 * 17


def test_foreach_launches_follow_multi_tensor_apply():
    """PyTorch's multi-tensor apply: at most 320 chunks of 65,536 elements a launch, and at most
    64 tensors a launch for two tensor lists (EMA's lerp)."""
    with fake_tensors():
        big = [torch.empty(200 * CHUNK) for _ in range(3)]  # 600 chunks: 2 launches
        small = [torch.empty(10) for _ in range(130)]  # 130 tensors: 3 launches
        trace = record(lambda: (torch._foreach_lerp_(big, [t.clone() for t in big], 0.1),
                                torch._foreach_lerp_(small, small, 0.1)), "foreach")
    lerps = [launch for launch in trace.launches if launch.op == "aten::_foreach_lerp_"]
    assert [launch.kernels for launch in lerps] == [math.ceil(600 / 320), math.ceil(130 / 64)]
    assert lerps[0].bytes == 3 * 3 * 200 * CHUNK * 4  # read both lists, write the first


def test_triton_launches_are_recorded_with_the_bytes_they_move():
    from jitfast import kernels
    rows, F = 23, 40
    with fake_tensors():
        x12 = torch.empty(rows, 2 * F, dtype=torch.bfloat16)
        trace = record(lambda: kernels.swiglu(x12), "swiglu")
    (launch,) = trace.launches
    assert (launch.op, launch.group) == ("_swiglu_fwd", "jitfast swiglu_fwd")
    assert launch.bytes == 2 * (rows * 2 * F + rows * F)


def test_a_training_step_is_traced_by_phase_and_line():
    """Every launch of a tiny model's step has a line of jitfast and a phase; the backward's aten
    ops sit at their forward line with the autograd node's name; each block's jitfast ops are
    opened up into their Triton launches."""
    from types import SimpleNamespace

    from jitfast.measure import traced
    args = SimpleNamespace(model="JiT-T/8", image_size=32, batch_size=3, backend="triton",
                           P_mean=-0.8, P_std=0.8, activation_checkpointing=False, fsdp=False,
                           compile=False, compile_mode="default", noise_scale=1.0,
                           ema_decays=(0.999, 0.99), weight_decay=0.0, clip_grad=1.0)
    trace = traced.training_step(args, num_classes=5)
    assert {launch.phase for launch in trace.launches} == {"forward", "backward", "optimizer",
                                                           "ema"}
    assert all(launch.site != "outside jitfast" for launch in trace.launches)
    backward_mm = [launch for launch in trace.launches
                   if launch.op == "aten::mm" and launch.phase == "backward"]
    assert backward_mm and all("network/model.py" in launch.site and "Backward" in launch.site
                               for launch in backward_mm)
    depth = 6  # JiT-T/8
    forward_norms = [launch for launch in trace.launches if launch.op == "_residual_norm_fwd"]
    assert len(forward_norms) == 3 * depth + 1
    groups = trace.groups()
    assert groups["optimizer"]["kernels"] >= 1 and groups["EMA"]["kernels"] >= 2
    assert trace.total()["TFLOP"] > 0
