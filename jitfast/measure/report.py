"""The benchmark report: the markdown table of a pytest-benchmark JSON document (or of the JSON
lines the benchmarks append as they finish), with the ImageNet epoch each training rate makes."""
import json

from jitfast.measure.throughput import IMAGENET_IMAGES, epoch_hours

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
