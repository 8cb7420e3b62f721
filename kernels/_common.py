"""What every kernel module shares: when to launch Triton, and how to split row reductions.

Kernels run for CUDA tensors. Under ``TRITON_INTERPRET=1`` (read once, before Triton decorates
any kernel) they also run for CPU tensors, which is how the test suite exercises them without a
GPU; otherwise CPU tensors go to the pure-PyTorch reference in ``jitfast.functional.ops``.
"""
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from jitfast.util.amp import autocast_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the SMs of the GPU a recording of launches stands for (``offline.recording``), else None
RECORDED_SMS = None


def use_kernel(tensor):
    """Whether the Triton kernel (rather than the PyTorch reference) handles this tensor."""
    return tensor.is_cuda or INTERPRET


@lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(groups, rows, device, per_sm=4):
    """Programs per group for a kernel that reduces over each of `groups` runs of `rows` rows and
    writes one partial sum per program: about per_sm programs per SM in all (enough to keep every
    SM streaming, few enough that the partial sums stay a small fraction of the traffic), at least
    one per group and at most one per row. Two per group on the CPU (the interpreter), so the
    tests cover programs that share a group's tiles, and programs left with none; while launches
    are recorded for a GPU (``offline.recording``), that GPU's count."""
    if RECORDED_SMS is not None:
        return max(1, min(rows, triton.cdiv(per_sm * RECORDED_SMS, groups)))
    if device.type != "cuda":
        return min(rows, 2)
    return max(1, min(rows, triton.cdiv(per_sm * _sm_count(device.index or 0), groups)))


def tile_rows(width):
    """triton.heuristics that sets a row-tile kernel's BLOCK_M, the rows of its 2-D tile, from the
    autotuned TILE (the tile's size in elements) and the constexpr named `width` (the lanes of a
    row). A config so bounds the registers a tile takes per thread whatever the row width (in JiT
    D from 768 to 1664, hd from 64 to 104); a tile may hold more rows than there are (the tail is
    masked)."""
    return triton.heuristics({"BLOCK_M": lambda args: max(1, args["TILE"] // args[width])})


def block(n, least=16):
    """The power-of-two block that covers n (at least `least`, the tl.dot minimum)."""
    return max(least, triton.next_power_of_2(n))


def dot_precision(dtype):
    """float32 operands multiply in IEEE float32 (faithful to the reference), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def weight_grad(a, b, dtype):
    """a @ b, a weight's grad (a reduction over all tokens), with both operands in dtype, the
    one the forward's matmul ran in (the weight's: autocast's bf16, or float32). A bf16 product
    runs on tensor cores, accumulating in float32, to a bf16 grad (the weight's dtype, which the
    grad takes anyway): what autocast's reference backward computes, without float32 copies of
    the (tokens × features) operands or a float32 GEMM. float32 stays float32, faithful to the
    reference."""
    return a.to(dtype) @ b.to(dtype)


def autocast_operands(*tensors):
    """The matmul operands as autocast would pass them to a matmul (cast to its dtype) when it is
    enabled for their device, so a fused op computes in the dtype the reference would."""
    dtype = autocast_dtype(tensors[0].device.type)
    return tensors if dtype is None else tuple(t.to(dtype) for t in tensors)


def tile_grid(**extents):
    """Launch grid of an autotuned kernel: one program per block of each extent, e.g.
    tile_grid(BLOCK_M=M) for blocks of BLOCK_M rows, whatever size the tuner picked."""
    return lambda meta: tuple(triton.cdiv(n, meta[name]) for name, n in extents.items())


def autotune(configs, key):
    """triton.autotune over a few configs on a GPU; under the interpreter only the first (its
    timings mean nothing). The key gets ROW_BUCKET, an argument every autotuned kernel takes
    (and ignores) with the value row_bucket(rows of the launch). Tuning benchmarks the kernel,
    so run each shape once before capturing a CUDA graph. Each config is timed for 20 ms after
    5 ms of warm-up (Triton's default, 100 + 25 ms, makes tuning outlast compiling on a cold
    machine; 20 ms is still hundreds of runs of these kernels)."""
    return triton.autotune(configs[:1] if INTERPRET else configs, key=[*key, "ROW_BUCKET"],
                           do_bench=_tuning_bench)


def _tuning_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def row_bucket(rows):
    """The problem size in an autotune key: the best tile for 256 rows (batch 1) is not the best
    for 32,768, while keying on the rows themselves would tune every batch size anew; so rows
    rounded up to a power of two (at least 16, so every bucket specialises the same and
    compiles nothing new): a run of fixed shapes tunes once."""
    return max(16, triton.next_power_of_2(rows))


def empty(like):
    """The placeholder for an output or gradient an op variant does not produce."""
    return like.new_empty(0)


@triton.jit
def program_tiles(n, BLOCK: tl.constexpr):
    """[first, last): the tiles of BLOCK rows, of the cdiv(n, BLOCK) covering n rows, that
    program_id(0) takes; the tiles are dealt out in contiguous runs, even to within one, among
    num_programs(0) programs (a program may get none)."""
    tiles = tl.cdiv(n, BLOCK)
    program = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    return program * tiles // programs, (program + 1) * tiles // programs


@triton.jit
def patch_offsets(tok, j, n_tok, grid_w, p, channels, s_b, s_c, s_h, s_w,
                  CHANNEL_LAST: tl.constexpr):
    """Element offsets into an NCHW image of entry j of token tok's patch vector.

    tok (BLOCK_M, 1) and j (1, BLOCK_J) are flat token and patch-vector indices; the vector is
    laid out (c, p, q) (the patch embedding's input) or (p, q, c) (the output head's).
    """
    b = tok // n_tok
    t = tok % n_tok
    row0 = (t // grid_w) * p
    col0 = (t % grid_w) * p
    if CHANNEL_LAST:
        c = j % channels
        dy = j // (p * channels)
        dx = (j // channels) % p
    else:
        c = j // (p * p)
        dy = (j // p) % p
        dx = j % p
    return b.to(tl.int64) * s_b + c * s_c + (row0 + dy) * s_h + (col0 + dx) * s_w


def image_geometry(image, p):
    """The (n_tok, grid_w, p, channels, strides...) arguments of patch_offsets for an NCHW image
    cut into p×p patches."""
    _, C, H, W = image.shape
    return ((H // p) * (W // p), W // p, p, C, *image.stride())
