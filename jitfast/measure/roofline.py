"""The GPU as ``jitfast.measure.trace`` prices it: a roofline with a cost per kernel, its
constants fitted to a profile that GPU measured (``fit``), and the comparison of a trace with such
a profile, group by group (``compare``).

A launch costs kernels × launch + max(bytes / bandwidth, FLOPs / rate), the rate being cuBLAS's
matmul peak for GEMMs, and for attention and jitfast's Triton matmul kernels (the patch embedding
and the output head) the rate each reached in the profiled step: those two are measured, not
modelled, and ``MODELLED`` leaves them out of the comparison. A GEMM with an operand whose rows
are not a multiple of 16 bytes runs on cuBLAS's fallback kernels, at ``unaligned_matmul``.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Roofline:
    """bandwidth in bytes/s; the rates (matmul, attention, triton_dot, unaligned_matmul) in
    FLOP/s; launch in seconds."""
    name: str
    bandwidth: float
    matmul: float
    launch: float
    attention: float
    triton_dot: float
    sms: int
    unaligned_matmul: float


# Fitted (``fit``) to benchmarks/results/2026-12-04-h200-profile.json, the graphed JiT-B/16 step
# at batch 128; tests/test_trace.py refits and checks them. The same lease measured 4.22 TB/s in a
# 1 GiB copy and 736 TFLOP/s in a bf16 8192³ matmul. unaligned_matmul is fitted to JiT-L/16's
# step (batch 64, graphed: 158 ms measured in benchmarks/results/2026-12-04-h200-bench.json),
# whose MLP matmuls have rows of 2730 bf16 (5,460 bytes): the code measured traces 61.3 ms for
# everything else and 29.3 ms for them at the matmul rate, so they ran 3.3x slower. JiT-H/16
# (width 3413: 2-byte rows, worse kernels again) then models 310 ms where 373 were measured.
H200 = Roofline("H200", bandwidth=4.0e12, matmul=740e12, launch=2.5e-6, attention=183e12,
                triton_dot=80e12, sms=132, unaligned_matmul=224e12)
PROFILE = "benchmarks/results/2026-12-04-h200-profile.json"
PROFILED_STEP = "train step JiT-B/16 256px batch 128 (triton+graph)"

# the groups whose time the roofline models from bytes and FLOPs alone (the calibration holds
# them within 10% of the profile); q/k-norm+RoPE's backward runs below the bandwidth (59% of it)
MODELLED = ("GEMM", "jitfast residual_norm_fwd", "jitfast residual_norm_bwd",
            "jitfast swiglu_fwd", "jitfast swiglu_bwd", "jitfast qk_norm_rope_fwd", "optimizer",
            "EMA")
BANDWIDTH_GROUPS = MODELLED[1:]


def price(launch, roofline):
    """Seconds of a launch (``jitfast.measure.trace.Launch``) on the roofline."""
    rate = {"matmul": roofline.matmul, "attention": roofline.attention,
            "triton_dot": roofline.triton_dot,
            "unaligned_matmul": roofline.unaligned_matmul}.get(launch.kind)
    compute = launch.flops / rate if rate else 0.0
    return launch.kernels * roofline.launch + max(launch.bytes / roofline.bandwidth, compute)


def work_seconds(group, measured_ms, roofline):
    """A profiled group's time less its kernels' fixed cost."""
    return measured_ms / 1e3 - group["kernels"] * roofline.launch


def fit(trace_groups, profile_groups, roofline):
    """`roofline` with bandwidth, matmul, attention and triton_dot fitted to a profile: the
    bandwidth from the bytes and time of the memory-bound groups, each rate from its group's
    FLOPs and time (the output head's forward for the Triton matmuls). KeyError for a group the
    trace or the profile lacks (a trace of code other than the profiled)."""
    def seconds(name):
        return work_seconds(trace_groups[name], profile_groups[name]["ms"], roofline)

    bandwidth = (sum(trace_groups[g]["GB"] for g in BANDWIDTH_GROUPS) * 1e9
                 / sum(seconds(g) for g in BANDWIDTH_GROUPS))
    rate = {g: trace_groups[g]["TFLOP"] * 1e12 / seconds(g)
            for g in ("GEMM", "attention", "jitfast output_head_fwd")}
    return replace(roofline, bandwidth=bandwidth, matmul=rate["GEMM"],
                   attention=rate["attention"], triton_dot=rate["jitfast output_head_fwd"])


def compare(trace_groups, profile_groups):
    """[(group, measured ms, modelled ms, modelled / measured - 1, modelled?)] for the groups in
    both, largest measured first."""
    rows = [(g, profile_groups[g]["ms"], trace_groups[g]["ms"],
             trace_groups[g]["ms"] / profile_groups[g]["ms"] - 1, g in MODELLED)
            for g in profile_groups if g in trace_groups]
    return sorted(rows, key=lambda row: -row[1])
