"""Benchmark arithmetic and reporting: analytic JiT FLOPs, MFU, the run's environment, and
``python -m jitfast.bench report results.json``, which turns the JSON written by
``pytest benchmarks/ --benchmark-only --benchmark-json results.json`` into the README's table.

FLOPs count 2 per multiply-add (DESIGN.md §6); a training step is 3× the forward.
"""
import argparse
import json
import platform
import sys

import torch

from jitfast.files import atomic_write_json
from jitfast.presets import preset_config
from jitfast.workloads import TRAIN_VARIANTS, needs_cuda

TRAIN_FACTOR = 3  # forward + backward (two matmuls per forward matmul)
IMAGENET_IMAGES = 1_281_167
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16
# peak HBM bandwidth (GB/s) by the first of these in the device's name, from NVIDIA's datasheets:
# H100 PCIe (HBM2e) 2.0 TB/s, H100 NVL 3.9, H100 SXM5 (HBM3) 3.35, H200 (HBM3e) 4.8
PEAK_HBM_GB_PER_S = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                     ("H200", 4800.0))


def forward_macs(depth, hidden_size, num_heads, bottleneck_dim, in_context_len,
                 in_context_start, patch_size, input_size, in_channels=3, mlp_ratio=4.0):
    """Multiply-adds of one image's forward pass: the matmuls of the patch embedding, every
    block (qkv, attention scores and values, proj, w12, w3, adaLN) and the final layer."""
    D = hidden_size
    patches = (input_size // patch_size) ** 2
    patch_dim = in_channels * patch_size ** 2
    hidden = int(int(D * mlp_ratio) * 2 / 3)
    macs = patches * (patch_dim * bottleneck_dim + bottleneck_dim * D)
    for i in range(depth):
        n = patches + (in_context_len if i >= in_context_start else 0)
        macs += n * (3 * D * D + D * D + 2 * D * hidden + hidden * D)  # qkv, proj, w12, w3
        macs += 2 * n * n * D  # scores q·kᵀ and the weighted sum of values, over all heads
        macs += 6 * D * D  # adaLN
    return macs + patches * D * patch_dim + 2 * D * D  # final Linear and its adaLN


def forward_flops(preset, input_size):
    """FLOPs of one image's forward pass through the preset at `input_size` px."""
    config = preset_config(preset)
    return 2 * forward_macs(input_size=input_size, **config)


def peak_tflops(device_name):
    """Dense bf16 peak of the device, or None where MFU is not reported (CPUs, other cards)."""
    return next((peak for chip, peak in PEAK_TFLOPS.items() if chip in device_name), None)


def peak_hbm_gb_per_s(device_name):
    """Peak HBM bandwidth of the device, or None where unknown (CPUs, other cards)."""
    return next((peak for chip, peak in PEAK_HBM_GB_PER_S if chip in device_name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device):
    """Device and library versions, for every benchmark's extra_info."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda if device.type == "cuda" else None)


def throughput(seconds, images, flops, device_name, baseline_seconds=None, traffic=0):
    """images/s, TFLOP/s, MFU, GB/s and the fraction of HBM bandwidth (None without a known
    peak), and speedup over the baseline's time (None without one) of a run that took `seconds`
    for `images` images, `flops` and `traffic` bytes it must read and write."""
    tflops = flops / seconds / 1e12 if flops else None
    gb_per_s = traffic / seconds / 1e9 if traffic else None
    peak, hbm = peak_tflops(device_name), peak_hbm_gb_per_s(device_name)
    return dict(seconds=seconds, images_per_s=images / seconds if images else None,
                tflops=tflops, mfu=tflops / peak if tflops and peak else None,
                gb_per_s=gb_per_s, hbm_fraction=gb_per_s / hbm if gb_per_s and hbm else None,
                speedup=baseline_seconds / seconds if baseline_seconds else None)


def epoch_hours(images_per_s):
    return IMAGENET_IMAGES / images_per_s / 3600


COLUMNS = ("benchmark", "variant", "preset", "shape", "dtype", "ms", "img/s", "TFLOP/s", "MFU",
           "GB/s", "of HBM", "speedup", "vs official")


def cell(value, fmt=None):
    """A table cell: – for a missing value; numbers to 3 significant digits, with separators."""
    if value is None:
        return "–"
    if fmt:
        return format(value, fmt)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table_row(bench, official_seconds=None):
    """A row's cells; `official_seconds`: the median of its group's "official" row, if any."""
    info = bench["extra_info"]
    seconds = info.get("seconds")
    return (bench["group"] or bench["name"], info.get("variant", ""), info.get("preset", ""),
            info.get("shape", ""), info.get("dtype", ""),
            cell(seconds * 1e3 if seconds else None),
            cell(info.get("images_per_s")), cell(info.get("tflops")),
            cell(info.get("mfu"), ".1%"), cell(info.get("gb_per_s")),
            cell(info.get("hbm_fraction"), ".0%"), cell(info.get("speedup"), ".2f"),
            cell(official_seconds / seconds if official_seconds and seconds else None, ".2f"))


def report(results):
    """The markdown table of a pytest-benchmark JSON document, then the epoch times."""
    benches = results["benchmarks"]
    first_seen = {}
    for b in benches:
        first_seen.setdefault(b["group"], len(first_seen))
    benches = sorted(benches, key=lambda b: first_seen[b["group"]])  # a group's rows together
    official = {b["group"]: b["extra_info"].get("seconds") for b in benches
                if b["extra_info"].get("variant") == "official"}
    devices = sorted({b["extra_info"].get("device", "?") for b in benches})
    info = benches[0]["extra_info"] if benches else {}
    lines = [f"Device: {', '.join(devices)}; torch {info.get('torch')}, triton "
             f"{info.get('triton')}, CUDA {info.get('cuda')}. Times are medians per call; "
             f"speedup is over the group's baseline (its first variant), vs official over the "
             f"group's row of the official JiT code (benchmarks/test_bench_official.py), both "
             f"in the same run.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(b, official.get(b["group"]))) + " |" for b in benches]
    training = [b["extra_info"] for b in benches if b["extra_info"].get("kind") == "train"
                and b["extra_info"].get("images_per_s")]
    if training:
        lines += ["", f"One ImageNet epoch ({IMAGENET_IMAGES:,} images) at the measured "
                      f"training rate:", ""]
        lines += [f"- {info['preset']} {info['variant']}: {cell(info['images_per_s'])} img/s → "
                  f"{epoch_hours(info['images_per_s']):.3g} h" for info in training]
    return "\n".join(lines)


def profile_report(args):
    """`python -m jitfast.bench profile`: training steps and a sampling run under torch.profiler,
    their time by group (see jitfast.profiling). Each part is printed, appended to --out
    (markdown) and saved to --json as soon as it is done, so a time-out or a failing part loses
    only itself. Returns the number of parts that failed."""
    from jitfast.profiling import profile
    from jitfast.train import set_cpu_threads
    from jitfast.workloads import sampler, training_step

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda:
        set_cpu_threads(None, 1)
    preset, image = args.preset or ("JiT-B/16" if cuda else "JiT-T/8"), args.image_size
    image = image or (256 if cuda else 64)
    batch = args.batch or (128 if cuda else 16)
    # on CUDA the eager step shows every kernel beside the host's gaps; the graphed one, what is
    # left of the gaps once the host is out of the loop
    variants = args.variant or (["triton", "triton+graph"] if cuda else ["eager"])
    steps = args.sample_steps or (50 if cuda else 8)
    sample_variant = "graphs" if cuda else "eager"
    parts = [(f"train step {preset} {image}px batch {batch} ({variant})",
              lambda variant=variant: training_step(preset, image, batch, variant, device), {})
             for variant in variants]
    parts.append((f"sampling {preset} {image}px batch {args.sample_batch}, {steps} Heun steps, "
                  f"cfg 2.9 on [0.1, 1] ({sample_variant}, all evaluations)",
                  lambda: sampler(preset, image, steps, args.sample_batch, sample_variant,
                                  device, 2.9, (0.1, 1.0)), dict(warmup=1, calls=2)))
    header = f"Device: {device_name(device)}; torch {torch.__version__}\n"
    print(header, flush=True)
    write_text(args.out, header)
    done, failed = [], 0
    for name, workload, settings in parts:
        try:
            result = profile(name, workload(), device, **settings)
        except Exception as err:  # the next part may still run: report this one, go on
            failed += 1
            text = f"### {name}: failed\n\n{type(err).__name__}: {err}"
        else:
            done.append(result.as_dict())
            text = result.table()
        print(f"\n{text}\n", flush=True)
        write_text(args.out, f"\n{text}\n", append=True)
        if args.json:
            atomic_write_json(args.json, {"environment": environment(device), "profiles": done})
    return failed


def write_text(path, text, append=False):
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(text)


def read_results(path):
    """A pytest-benchmark JSON document, or the JSON lines that benchmarks/conftest.py appends
    as each result is measured (JITFAST_BENCH_LOG; a torn last line is skipped)."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        benches = []
        for line in f:
            try:
                benches.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return {"benchmarks": benches}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.bench",
                                description="Benchmark reports and profiles (see benchmarks/).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("report", help="print the markdown table of a --benchmark-json file") \
        .add_argument("results", help="the JSON written by pytest --benchmark-json, or the "
                                      "JSON lines of JITFAST_BENCH_LOG (.jsonl)")
    prof = sub.add_parser("profile", help="where a training step's and a sampling run's time "
                                          "goes (torch.profiler)")
    prof.add_argument("--preset", help="default: JiT-B/16 on CUDA, JiT-T/8 on the CPU")
    prof.add_argument("--image-size", type=int, help="default: 256 on CUDA, 64 on the CPU")
    prof.add_argument("--batch", type=int, help="training batch; default: 128 CUDA, 16 CPU")
    prof.add_argument("--variant", choices=sorted(TRAIN_VARIANTS), action="append",
                      help="training variant (repeat for several); default: triton and "
                           "triton+graph on CUDA, eager on the CPU")
    prof.add_argument("--sample-batch", type=int, default=1, help="sampling batch")
    prof.add_argument("--sample-steps", type=int, help="default: 50 on CUDA, 8 on the CPU")
    prof.add_argument("--device", help="default: cuda when available")
    prof.add_argument("--json", help="also write the profiles as JSON to this file")
    prof.add_argument("--out", help="also write the markdown to this file")
    args = p.parse_args(argv)
    if args.command == "profile":
        cuda_only = [v for v in args.variant or () if needs_cuda(v)]
        if cuda_only and not torch.cuda.is_available():
            p.error(f"--variant {', '.join(cuda_only)} runs on CUDA only")
        if profile_report(args):
            sys.exit(1)
        return
    try:
        results = read_results(args.results)
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"error: cannot read {args.results!r}: {err}")
    print(report(results))


if __name__ == "__main__":
    main()
