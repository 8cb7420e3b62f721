"""``python -m jitfast.bench report results.json``: the README's table from the JSON written by
``pytest benchmarks/ --benchmark-only --benchmark-json results.json`` (jitfast.measure.report);
``python -m jitfast.bench profile``: where a training step's and a sampling run's time goes
(jitfast.measure.profiling); ``python -m jitfast.bench trace``: the same priced on a GPU's
roofline from a dispatch trace, on any machine (jitfast.measure.trace)."""
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


def trace_report(args):
    """`python -m jitfast.bench trace`: the trace's table (and JSON), and with --calibrate the
    comparison with a profile of the GPU, group by group, and the roofline fitted to it."""
    from jitfast.measure import traced
    from jitfast.measure.roofline import compare, fit
    from jitfast.measure.trace import Trace

    set_cpu_threads(None, 1)
    if args.from_json:
        with open(args.from_json) as f:
            trace = Trace.from_dict(json.load(f))
    elif args.work == "train":
        from jitfast.train import parse_args
        train_args = parse_args(["--model", args.preset or "JiT-B/16", "--image-size",
                                 str(args.image_size or 256), "--batch-size",
                                 str(args.batch or 128), "--backend", args.backend])
        trace = traced.training_step(train_args)
    elif args.work == "sample":
        trace = traced.sampling(args.preset or "JiT-B/16", args.image_size or 256,
                                args.batch or 1, args.method, args.steps or 50, args.cfg,
                                tuple(args.interval), args.schedule, args.backend)
    elif args.work == "pmf-train":
        trace = traced.pmf_loss_step(args.preset or "pMF-B/16", args.image_size or 256,
                                     args.batch or 128, args.backend)
    else:
        trace = traced.pmf_sampling(args.preset or "pMF-B/16", args.image_size or 256,
                                    args.batch or 1, args.steps or 1, args.backend)
    text = trace.table(args.top)
    if "passes" in trace.notes:
        text += "\n\nexamples a network pass: " + ", ".join(
            f"{name} {n}" for name, n in trace.notes["passes"].items())
    if "evaluations" in trace.notes:
        evals = trace.notes["evaluations"]
        total = trace.total()
        text += (f"\n\n{evals} network evaluations: {total['ms'] / max(evals, 1):.3f} ms and "
                 f"{total['kernels'] / max(evals, 1):.0f} kernels per evaluation")
    result = trace.as_dict(launches=args.launches)
    if args.calibrate:
        with open(args.calibrate) as f:
            profiles = {p["name"]: p["groups"] for p in json.load(f)["profiles"]}
        if args.profile not in profiles:
            sys.exit(f"error: {args.calibrate} has no profile named {args.profile!r}; it has "
                     f"{sorted(profiles)}")
        measured = profiles[args.profile]
        rows = compare(trace.groups(), measured)
        text += ("\n\n### against the profile\n\n| group | measured ms | modelled ms | error |"
                 " modelled |\n|---|---|---|---|---|\n" + "\n".join(
                     f"| {g} | {m:.3f} | {p:.3f} | {e:+.1%} | {how_priced(g, mod)} |"
                     for g, m, p, e, mod in rows))
        try:
            fitted = fit(trace.groups(), measured, trace.roofline)
        except KeyError as err:
            text += (f"\n\nno fit: this trace has no group {err} of the profile's (the code "
                     f"changed since the profile; fit the trace of the profiled code, "
                     f"--from-json tests/fixtures/trace_jit_b16_step_e8a6fb2.json)")
        else:
            text += (f"\n\nfitted: bandwidth {fitted.bandwidth / 1e12:.2f} TB/s, matmul "
                     f"{fitted.matmul / 1e12:.0f} TFLOP/s, attention "
                     f"{fitted.attention / 1e12:.0f} TFLOP/s, Triton matmul kernels "
                     f"{fitted.triton_dot / 1e12:.0f} TFLOP/s (in use: {trace.roofline})")
        result["calibration"] = [dict(group=g, measured_ms=m, modelled_ms=p, error=e,
                                      modelled=mod) for g, m, p, e, mod in rows]
    print(text)
    write_text(args.out, text + "\n")
    if args.json:
        atomic_write_json(args.json, result)


def how_priced(group, modelled):
    """The comparison table's last column: the roofline models the group, takes its rate from
    the profile, or cannot model it."""
    if modelled:
        return "yes"
    return "rate measured" if group in ("attention", "jitfast output_head_fwd") else "no"


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
    trace = sub.add_parser("trace", help="a training step or sampling run traced on fake tensors "
                                         "and priced on the H200's roofline (no GPU needed)")
    trace.add_argument("work", nargs="?", default="train",
                       choices=("train", "sample", "pmf", "pmf-train"),
                       help="a JiT training step, a JiT sampling run, pMF's sampling, or pMF's "
                            "objective and backward")
    trace.add_argument("--preset", help="default: JiT-B/16 (train, sample), pMF-B/16 (pmf, "
                                        "pmf-train)")
    trace.add_argument("--image-size", type=int, help="default: 256")
    trace.add_argument("--batch", type=int,
                       help="default: 128 (train, pmf-train), 1 (sample, pmf)")
    trace.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                       help="the model's ops; auto: as on CUDA, the Triton kernels")
    trace.add_argument("--method", default="heun", help="sampler (sample)")
    trace.add_argument("--steps", type=int, help="sampler steps; default: 50 (sample), 1 (pmf)")
    trace.add_argument("--schedule", default="linear", help="sampler time grid (sample)")
    trace.add_argument("--cfg", type=float, default=2.9, help="guidance scale (sample)")
    trace.add_argument("--interval", type=float, nargs=2, default=(0.1, 1.0),
                       help="guidance interval (sample)")
    trace.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    trace.add_argument("--calibrate", metavar="PROFILE_JSON",
                       help="compare with a profile's groups (python -m jitfast.bench profile "
                            "--json) and fit the roofline to it")
    trace.add_argument("--profile", default="train step JiT-B/16 256px batch 128 (triton+graph)",
                       help="the profile of --calibrate to compare with")
    trace.add_argument("--from-json", metavar="TRACE_JSON",
                       help="price a trace written by --json --launches (e.g. the fixture of the "
                            "profiled step) instead of tracing")
    trace.add_argument("--launches", action="store_true",
                       help="with --json: every launch too, for --from-json")
    trace.add_argument("--json", help="also write the trace as JSON to this file")
    trace.add_argument("--out", help="also write the markdown to this file")
    args = p.parse_args(argv)
    if args.command == "trace":
        return trace_report(args)
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
