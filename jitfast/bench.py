"""``python -m jitfast.bench report results.json``: the README's table from the JSON written by
``pytest benchmarks/ --benchmark-only --benchmark-json results.json`` (jitfast.measure.report);
``python -m jitfast.bench profile``: where a training step's and a sampling run's time goes
(jitfast.measure.profiling)."""
import argparse
import json
import sys

import torch

from jitfast.measure.report import read_results, report
from jitfast.measure.throughput import device_name, environment
from jitfast.measure.workloads import TRAIN_VARIANTS, cuda_only
from jitfast.util.files import atomic_write_json
from jitfast.util.threads import set_cpu_threads


def profile_report(args):
    """`python -m jitfast.bench profile`: training steps and a sampling run under torch.profiler,
    their time by group (see jitfast.measure.profiling). Each part is printed, appended to --out
    (markdown) and saved to --json as soon as it is done, so a time-out or a failing part loses
    only itself. Returns the number of parts that failed."""
    from jitfast.measure.profiling import profile
    from jitfast.measure.workloads import sampler, training_step

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
        refused = [v for v in args.variant or () if cuda_only(v)]
        if refused and not torch.cuda.is_available():
            p.error(f"--variant {', '.join(refused)} runs on CUDA only")
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
