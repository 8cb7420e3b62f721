"""A GPU step priced on a machine without one: the dispatch trace.

A piece of work (a training step, a sampling trajectory) runs on fake tensors (shapes, dtypes and
strides, no storage, no compute) under a dispatch mode that records every aten operator that would
launch a kernel on CUDA, with the bytes it moves, its FLOPs, the line of jitfast that called it and
the phase it ran in; each jitfast custom op is opened up (its own Python runs, so its aten ops and
its Triton launches, recorded through ``jitfast.kernels.offline``, are seen one by one). A roofline
of the GPU prices each launch: a fixed cost per kernel plus the longer of its bytes over the
memory bandwidth and its FLOPs over the matmul peak.

What it cannot see: attention's and the Triton matmuls' real efficiency (priced at rates measured
on the GPU, see ``Roofline``), launches that exist on CUDA only (memsets of workspaces, cuBLAS's
split-K reductions), the allocator, and kernels that run below the bandwidth (tiles, occupancy).
The work must not read tensor values on the host (fake tensors have none): the same rule as for
code captured in a CUDA graph.
"""
import inspect
import math
import re
import traceback
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from jitfast.kernels import offline
from jitfast.measure.profiling import group_of
from jitfast.measure.roofline import H200, Roofline, price
from jitfast.util.markers import current_phase


# Multi-tensor-apply (foreach ops, fused AdamW): a launch takes at most 320 chunks of 65,536
# elements, and at most this many tensors by the number of tensor lists it reads.
CHUNK, BLOCKS_PER_LAUNCH = 65536, 320
MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
# aten ops that launch no kernel although their schema does not say they alias an input
NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty",
             "new_empty_strided", "lift_fresh", "lift_fresh_copy", "_local_scalar_dense",
             "_record_function_enter_new", "_record_function_exit", "device", "resize_",
             "set_", "detach", "_to_copy_noop"}
# in-place ops that overwrite their output without reading it
OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_",
             "exponential_"}
COPIES = {"_to_copy", "copy_", "clone", "cat", "contiguous", "slice_backward", "select_backward",
          "constant_pad_nd", "slice_scatter", "select_scatter", "index_put_", "index_put"}
# cuDNN's attention backward is three kernels on the H200 (the profile: 48 for 12 layers)
ATTENTION_BACKWARD_KERNELS = 3


def footprint(t):
    """Bytes a kernel moves for tensor t: its elements, or fewer where strides repeat them (a
    broadcast)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def rows_aligned(tensors, alignment=16):
    """Whether every row of every tensor starts `alignment` bytes after the last (each stride
    of a dimension longer than 1 but the innermost's): what a GPU's fast matmul kernels need of
    their operands."""
    return all(stride * t.element_size() % alignment == 0
               for t in tensors for n, stride in zip(t.shape, t.stride()) if n > 1 and stride > 1)


def launches_of_lists(lists, depth):
    """Kernels that multi-tensor-apply launches over tensor lists of `depth` lists (as PyTorch's
    MultiTensorApply packs chunks and tensors into launches); the first list sets the chunks."""
    per_launch = MAX_TENSORS.get(depth, 30)
    launches = tensors = blocks = 0
    for t in lists[0]:
        chunks = math.ceil(t.numel() / CHUNK)
        tensors += 1
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if blocks == BLOCKS_PER_LAUNCH or (tensors == per_launch and last):
                launches, blocks = launches + 1, 0
                tensors = 0 if last else 1
    return launches + (blocks > 0)


# FLOPs of the Triton kernels that multiply matrices, from their named arguments
TRITON_FLOPS = {
    "_output_head_fwd": lambda a: 2 * a["M"] * a["D"] * a["P"] * (2 if a["GUIDED"] or a["DUAL"]
                                                                  else 1),
    "_output_head_bwd": lambda a: 2 * a["M"] * a["P"] * a["D"],
    "_patch_embed_fwd": lambda a: 2 * a["M"] * a["K"] * (a["n_cols"] + a["D"]),
    "_patch_embed_bwd": lambda a: 2 * a["M"] * a["K"] * (a["n_cols"] + a["D"]
                                                         + a["n_cols"] * a["NEEDS_DX"]),
    "_swiglu_matmul_fwd": lambda a: 2 * a["M"] * a["K"] * 2 * a["F"],
    "_swiglu_matmul_bwd": lambda a: 2 * a["M"] * a["K"] * a["F"],
    # S and the two halves of Ṡ, then P·V, (P⊙Ṡ)·V and P·V̇: six (N × N × hd) products a head
    "_attention_jvp_fwd": lambda a: 12 * a["Q"].shape[0] * a["H"] * a["N"] ** 2 * a["HD"],
}
# Triton kernels priced at another rate than the Triton matmuls' measured one: attention's
# tangent at SDPA's, the SwiGLU MLP's matmuls at cuBLAS's (assumptions until a GPU measures them)
TRITON_KIND = {"_attention_jvp_fwd": "attention", "_swiglu_matmul_fwd": "matmul",
               "_swiglu_matmul_bwd": "matmul"}


# the groups whose work is matrix products: cuBLAS's and the Triton matmuls priced as cuBLAS's
# (with their epilogues); "everything but the matmuls and attention" leaves these out
MATMUL_GROUPS = ("GEMM", *(group_of(name) for name, kind in TRITON_KIND.items()
                           if kind == "matmul"))


# Triton kernels that update tensors in place: these arguments are read and written
TRITON_IN_PLACE = {"_adamw_ema_step": ("P", "M", "V", "E1", "E2")}


def matmul_flops(name, tensors):
    """FLOPs (2 per multiply-add) of an aten matmul or attention op, 0 for anything else."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = tensors[-2], tensors[-1]
        return 2 * a.numel() * b.shape[-1]
    if "scaled_dot_product" in name:
        q, k, v = tensors[:3]
        forward = 2 * q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return forward * 5 // 2 if "backward" in name else forward
    return 0


@dataclass
class Launch:
    """The kernels of one op call: what the trace records."""
    op: str        # aten::<name> or the Triton kernel's name
    group: str     # as python -m jitfast.bench profile groups GPU time
    site: str      # the innermost line of jitfast that ran it
    origin: str    # the model-level line it serves (for a backward op: its forward's line)
    phase: str
    kernels: int
    bytes: int
    flops: int
    kind: str = "memory"  # what bounds it besides memory: "matmul", "attention", "triton_dot",
    # "unaligned_matmul" (a GEMM on rows that are not a multiple of 16 bytes: rows_aligned)
    seconds: float = 0.0


@dataclass
class Trace:
    """The launches of one piece of work, priced on `roofline`."""
    name: str
    roofline: Roofline
    launches: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def priced(self, roofline):
        """The same launches priced on another roofline."""
        launches = [replace(launch, seconds=price(launch, roofline)) for launch in self.launches]
        return Trace(self.name, roofline, launches, dict(self.notes))

    def groups(self):
        """{group: {"kernels", "GB", "TFLOP", "ms"}}, largest modelled time first."""
        return summed(self.launches, lambda launch: launch.group)

    def ops(self):
        """{(op, origin, site): totals}, the rows of the per-op table."""
        return summed(self.launches, lambda launch: (launch.op, launch.origin, launch.site))

    def total(self, exclude=()):
        """Totals over every group but those in `exclude`."""
        rows = [launch for launch in self.launches if launch.group not in exclude]
        return summed(rows, lambda launch: "all").get("all", totals())

    def table(self, top=25):
        """Markdown: the groups, then the `top` ops by modelled time."""
        total = self.total()
        lines = [f"### {self.name}: {total['ms']:.2f} ms modelled on the {self.roofline.name} "
                 f"({total['kernels']} kernels, {total['GB']:.2f} GB, {total['TFLOP']:.2f} TFLOP)",
                 "", "| group | kernels | GB | TFLOP | modelled ms |", "|---|---|---|---|---|"]
        lines += [f"| {g} | {r['kernels']} | {r['GB']:.3f} | {r['TFLOP']:.3f} | {r['ms']:.3f} |"
                  for g, r in self.groups().items()]
        if top:
            lines += ["", "| op | called from | line | kernels | GB | TFLOP | modelled ms |",
                      "|---|---|---|---|---|---|---|"]
        for (op, origin, site), r in list(self.ops().items())[:top]:
            lines.append(f"| {op} | {origin} | {site} | {r['kernels']} | {r['GB']:.3f} | "
                         f"{r['TFLOP']:.3f} | {r['ms']:.3f} |")
        return "\n".join(lines)

    def as_dict(self, launches=False):
        """The totals, groups and ops; with launches, every launch too (identical ones as one
        row with a count), from which ``from_dict`` rebuilds the trace."""
        found = dict(name=self.name, roofline=self.roofline.__dict__, notes=self.notes,
                     total=self.total(), groups=self.groups(),
                     ops=[dict(op=op, origin=origin, site=site, **r)
                          for (op, origin, site), r in self.ops().items()])
        if launches:
            counts = defaultdict(int)
            for launch in self.launches:
                counts[tuple(replace(launch, seconds=0.0).__dict__.items())] += 1
            found["launches"] = [dict(row, count=n) for row, n in counts.items()]
        return found

    @classmethod
    def from_dict(cls, found, roofline=H200):
        """The trace of ``as_dict(launches=True)``, priced on `roofline`."""
        launches = [Launch(**{k: v for k, v in row.items() if k != "count"})
                    for row in found["launches"] for _ in range(row["count"])]
        return cls(found["name"], roofline, launches, found.get("notes", {})).priced(roofline)


def totals():
    return {"kernels": 0, "GB": 0.0, "TFLOP": 0.0, "ms": 0.0}


def summed(launches, key):
    found = defaultdict(totals)
    for launch in launches:
        row = found[key(launch)]
        row["kernels"] += launch.kernels
        row["GB"] += launch.bytes / 1e9
        row["TFLOP"] += launch.flops / 1e12
        row["ms"] += launch.seconds * 1e3
    return dict(sorted(found.items(), key=lambda item: -item[1]["ms"]))


# --- where a launch comes from ------------------------------------------------------------------

OWN_FILES = ("/jitfast/measure/trace.py", "/kernels/offline.py", "/jitfast/util/markers.py")
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def short(filename, line, function):
    """'network/model.py:88 forward' for a file of jitfast (or kernels/)."""
    for root in ("/jitfast/", "/kernels/"):
        if root in filename:
            path = filename.rsplit(root, 1)[1]
            return f"{'kernels/' if root == '/kernels/' else ''}{path}:{line} {function}"
    return f"{filename}:{line} {function}"


def ours(filename):
    return (("/jitfast/" in filename or "/kernels/" in filename)
            and not filename.endswith(OWN_FILES) and "/site-packages/torch/" not in filename)


def model_level(filename):
    """A line that serves the model rather than implementing an op."""
    return ours(filename) and "/kernels/" not in filename and "/functional/" not in filename


def sites(frames):
    """(site, origin) of (filename, line, function) frames, outermost first."""
    mine = [f for f in frames if ours(f[0])]
    upper = [f for f in mine if model_level(f[0])]
    site = short(*mine[-1]) if mine else "outside jitfast"
    return site, short(*upper[-1]) if upper else site


def live_frames():
    return [(f.filename, f.lineno, f.name) for f in traceback.extract_stack()]


def forward_frames(node):
    """The frames that created autograd node `node` (anomaly mode records them)."""
    lines = node.metadata.get("traceback_") or []
    return [(m[1], int(m[2]), m[3]) for line in lines for m in FRAME.finditer(line)]


def where():
    """(site, origin) of the op being dispatched. In the backward pass, an op that autograd runs
    for a forward op (no line of jitfast of its own) is placed at that forward op's line."""
    frames = live_frames()
    node = torch._C._current_autograd_node()
    if node is None:
        return sites(frames)
    forward_site, forward_origin = sites(forward_frames(node))
    mine = [f for f in frames if ours(f[0]) and "/kernels/" in f[0]]
    if mine:  # a jitfast op's own backward
        return short(*mine[-1]), forward_origin
    return f"{forward_site} ({node.name()})", forward_origin


# --- recording ----------------------------------------------------------------------------------

def is_view(func):
    """Whether an aten op returns a view of an input (no kernel)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def aten_launch(func, args, kwargs, out):
    """(name, kernels, bytes, flops) of an aten op call, or None if it launches no kernel."""
    name = func._schema.name.split("::")[-1]
    if name in NO_KERNEL or func.namespace not in ("aten", "prims") or is_view(func):
        return None
    if not any(isinstance(t, torch.Tensor) for t in tree_leaves((args, kwargs, out))):
        return None  # arithmetic on dtypes or shapes
    schema = func._schema.arguments
    values = dict(zip([a.name for a in schema], args), **kwargs)
    reads, writes, lists = 0, 0, []
    for arg in schema:
        value = values.get(arg.name)
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        if not tensors:
            continue
        if isinstance(value, (list, tuple)):
            lists.append(tensors)
        written = arg.alias_info is not None and arg.alias_info.is_write
        overwritten = written and (name in OVERWRITE or arg.kwarg_only and arg.name == "out")
        if name.startswith("_fused_adam") and arg.name == "grads":
            written = False  # marked mutable for the grad scaler, only read here
        if not overwritten:
            reads += sum(map(footprint, tensors))
        if written:
            writes += sum(map(footprint, tensors))
    returns = func._schema.returns
    for r, value in zip(returns, out if len(returns) > 1 else (out,)):
        if r.alias_info is None:
            writes += sum(footprint(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if lists and name.startswith("_fused_adam"):
        kernels = launches_of_lists(lists, 4)  # params, grads and the two moments
    elif lists and name.startswith("_foreach"):
        kernels = launches_of_lists(lists, len(lists))
    elif "scaled_dot_product" in name and "backward" in name:
        kernels = ATTENTION_BACKWARD_KERNELS
    else:
        kernels = 1
    return name, kernels, reads + writes, matmul_flops(name, inputs)


def aten_group(name, phase):
    """The profile's group of an aten op as its CUDA kernel would be named."""
    if name in COPIES and phase not in ("optimizer", "ema"):
        return "casts and copies"
    return group_of(f"aten::{name}", phase)


class TraceMode(TorchDispatchMode):
    """Records the launches of the ops dispatched under it (see the module's docstring)."""

    def __init__(self, roofline):
        super().__init__()
        self.roofline = roofline
        self.launches = []

    def add(self, op, group, kernels, nbytes, flops, kind):
        site, origin = where()
        launch = Launch(op, group, site, origin, current_phase() or "", kernels, nbytes, flops,
                        kind)
        launch.seconds = price(launch, self.roofline)
        self.launches.append(launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "jitfast":  # opened up: its own ops and launches are recorded
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        found = aten_launch(func, args, kwargs, out)
        if found is not None:
            name, kernels, nbytes, flops = found
            group = aten_group(name, current_phase())
            kind = "attention" if group == "attention" else "matmul" if flops else "memory"
            if kind == "matmul" and not rows_aligned(
                    [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]):
                kind, name = "unaligned_matmul", f"{name} (unaligned rows)"
            self.add(f"aten::{name}", group, kernels, nbytes, flops, kind)
        return out

    def triton_launch(self, kernel, args, kwargs):
        """offline.recording's callback: a Triton launch."""
        name = kernel.fn.__name__
        named = dict(zip(arg_names(kernel.fn), args), **kwargs)
        tensors = [t for t in named.values() if isinstance(t, torch.Tensor)]
        twice = [named[k] for k in TRITON_IN_PLACE.get(name, ()) if named.get(k) is not None]
        flops = TRITON_FLOPS[name](named) if name in TRITON_FLOPS else 0
        phase = current_phase()
        kind = TRITON_KIND.get(name, "triton_dot") if flops else "memory"
        self.add(name, group_of(name, phase), 1, sum(map(footprint, tensors + twice)), flops,
                 kind)


@lru_cache(maxsize=None)
def arg_names(fn):
    return list(inspect.signature(fn).parameters)


@contextmanager
def fake_tensors():
    """Within the block, tensors made (batches drawn, optimizer states) are fake: no storage."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def faked(module, device=torch.device("cpu")):
    """`module` (built on the meta device: no memory, no initialisation work) with each
    parameter and buffer replaced by a fake tensor of its shape, strides and dtype on `device`;
    call inside ``fake_tensors``."""
    def fake(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)

    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(p), p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = fake(b)
    return module


def record(work, name, roofline=H200):
    """Trace of work() (run inside ``fake_tensors``): every kernel it would launch, priced."""
    mode = TraceMode(roofline)
    with warnings.catch_warnings():  # anomaly mode announces itself: it only records lines here
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
        with offline.recording(mode.triton_launch, roofline.sms), \
                torch.autograd.set_detect_anomaly(True, check_nan=False), mode:
            work()
    return Trace(name, roofline, mode.launches)
