"""Where a step's time goes: one call profiled with torch.profiler, its device time grouped into
GEMMs, attention, each jitfast kernel by name, kernels Inductor generated, casts and copies, the
optimizer, the EMA and the rest, beside the wall time and the time the device sat idle.

On CUDA the groups hold GPU kernel time; on the CPU, the self time of each operator (there the
"idle" row is the host's own time outside operators: Python and dispatch).
"""
import re
import time
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType

# (group, pattern on a kernel or operator name), first match wins; jitfast's Triton kernels
# (named _<op>_fwd / _<op>_bwd) and custom ops (jitfast::<op>) each get a group of their own.
GROUPS = (
    ("optimizer", r"adam"),
    ("EMA", r"lerp"),
    ("attention", r"flash|fmha|attention|cudnn|sdpa|softmax"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|^sm\d+_|^aten::(mm|addmm|bmm|baddbmm)$"),
    ("Inductor kernels", r"^triton_"),
    ("casts and copies", r"copy|cast|convert|^aten::(to|_to_copy|cat|contiguous)$"),
)
JITFAST = re.compile(r"^_(\w+_(fwd|bwd))$|^jitfast::(\w+)")
# the phases (jitfast.util.markers) whose operators all belong to one group
PHASE_GROUPS = {"optimizer": "optimizer", "ema": "EMA"}


def group_of(name, phase=None):
    """The group of a kernel or operator name, run inside `phase` (a jitfast.util.markers name)."""
    if phase in PHASE_GROUPS:
        return PHASE_GROUPS[phase]
    found = JITFAST.search(name)
    if found:
        return f"jitfast {found.group(1) or found.group(3)}"
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered if not pattern.startswith("^aten") else name):
            return group
    return "other"


@dataclass
class Profile:
    """Per-call times in milliseconds: wall (host, synchronised), busy (device time) per group
    with the number of kernels or operators, and idle = wall - busy."""
    name: str
    device: str
    wall_ms: float
    groups: dict  # group -> (ms, count)

    @property
    def busy_ms(self):
        return sum(ms for ms, _ in self.groups.values())

    def table(self):
        rows = sorted(self.groups.items(), key=lambda item: -item[1][0])
        unit = "GPU kernels" if self.device == "cuda" else "operators (self time)"
        lines = [f"### {self.name}: {self.wall_ms:.2f} ms per call ({self.device})", "",
                 f"| group | ms | share of wall | {unit} |", "|---|---|---|---|"]
        lines += [f"| {group} | {ms:.3f} | {ms / self.wall_ms:.1%} | {count} |"
                  for group, (ms, count) in rows]
        idle = self.wall_ms - self.busy_ms
        what = "device idle" if self.device == "cuda" else "outside operators"
        lines.append(f"| ({what}) | {idle:.3f} | {idle / self.wall_ms:.1%} | |")
        return "\n".join(lines)

    def as_dict(self):
        return dict(name=self.name, device=self.device, wall_ms=self.wall_ms,
                    busy_ms=self.busy_ms, idle_ms=self.wall_ms - self.busy_ms,
                    groups={g: dict(ms=ms, count=n) for g, (ms, n) in self.groups.items()})


def cpu_phase(event):
    """The outermost jitfast.util.markers phase an operator ran in, or None."""
    phase = None
    parent = event.cpu_parent
    while parent is not None:
        if getattr(parent, "is_user_annotation", False):
            phase = parent.name
        parent = parent.cpu_parent
    return phase


def device_groups(events, calls):
    """{group: (ms per call, kernels per call)} of the CUDA kernels; GPU-side phase ranges,
    where the profiler records them, attribute kernels to the optimizer and EMA phases."""
    kernels, phases = [], []
    for e in events:
        if e.device_type == DeviceType.CUDA:
            (phases if getattr(e, "is_user_annotation", False) else kernels).append(e)
    groups = {}
    for k in kernels:
        start = k.time_range.start
        phase = next((p.name for p in phases
                      if p.time_range.start <= start < p.time_range.end), None)
        ms, n = groups.get(group_of(k.name, phase), (0.0, 0))
        groups[group_of(k.name, phase)] = (ms + k.time_range.elapsed_us() / 1e3 / calls,
                                           n + 1 / calls)
    return groups


def host_groups(events, calls):
    """{group: (ms per call, operators per call)} of the CPU operators' self time."""
    groups = {}
    for e in events:
        if e.device_type != DeviceType.CPU or getattr(e, "is_user_annotation", False):
            continue
        group = group_of(e.name, cpu_phase(e))
        ms, n = groups.get(group, (0.0, 0))
        groups[group] = (ms + e.self_cpu_time_total / 1e3 / calls, n + 1 / calls)
    return groups


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, calls):
    """Milliseconds per call of fn() over `calls` calls, the device synchronised."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / calls


def profile(name, fn, device, warmup=3, calls=3):
    """Profile(name) of fn(), run `warmup` times first (compiles, autotuning, graph capture),
    then `calls` times timed and `calls` times under the profiler."""
    for _ in range(warmup):
        fn()
    wall = timed(fn, device, calls)  # GPU idle time: against the wall time without profiler
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        profiled_wall = timed(fn, device, calls)
    if device.type != "cuda":  # operator self times include the profiler's cost: compare like
        wall = profiled_wall
    events = prof.events()
    groups = device_groups(events, calls) if device.type == "cuda" else host_groups(events, calls)
    return Profile(name, device.type, wall, {g: (ms, round(n)) for g, (ms, n) in groups.items()})
