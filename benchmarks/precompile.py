"""What a GPU run of benchmarks/device_check.sh compiles, measured without a GPU: the Triton kernel
variants and autotune keys that the plan's workloads launch — a training step of each preset
(Triton kernels, bf16 autocast as on CUDA), the planned JiT samplers (bf16 network, guidance on
[0.1, 1]) and pMF's one-step sampler of each planned pMF preset (bf16 network) — each variant
compiled for sm_90 (every autotune config, as the tuner compiles them) into Triton's cache, with
the time it takes; and pMF's objective with its backward (the dual kernels) for the first
pMF preset.

    python benchmarks/precompile.py [--presets JiT-B/16 JiT-L/16] [--arch 90]

The workloads run at batch 1 on the CPU with the kernels compiled but not run (their outputs are
garbage; only what is launched matters): the variants do not depend on the batch (the token
counts, 256 and 288, are multiples of 16 at any batch), but the autotune keys' size buckets do,
so the count of keys is that of batch 1. pMF's 276 tokens (20 + 256) are no multiple of 16, yet
its variants were found the same at batches 1, 4, 16 and 32 (pMF-B/16); its network runs with
two blocks (one shared, one u-head block): every block of a preset launches the same variants and
tuning keys (checked against the full pMF-B/16), so depth would only cost the CPU time.
Needs Triton 3, no TRITON_INTERPRET.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jitfast.kernels import _common, offline  # noqa: E402  (after the checkout joins the path)


class Compiler:
    """Compiles each new variant as it is launched; counts variants, tuning keys and seconds."""

    def __init__(self):
        self.variants, self.tuning_keys, self.seconds = set(), set(), 0.0

    def launch(self, kernel, args, kwargs):
        key = offline.variant_key(kernel, args, kwargs)
        if key not in self.variants:
            self.variants.add(key)
            start = time.perf_counter()
            offline.compile_variant(kernel, args, kwargs)
            self.seconds += time.perf_counter() - start

    def summary(self):
        kernels = sorted({name for name, _ in self.variants})
        return (f"{len(self.variants)} variants of {len(kernels)} kernels, "
                f"{len(self.tuning_keys)} autotune keys, {self.seconds:.1f} s of compiling")


def training(preset):
    from jitfast.measure.workloads import training_step
    with torch.autocast("cpu", torch.bfloat16):  # the kernels' operands as CUDA autocast casts them
        # the step of one GPU: its optimizer's update kernel and bf16 compute copies included
        training_step(preset, 256, 1, "triton", torch.device("cpu"), cuda=True)()


def sampling(preset, method, steps, schedule):
    from jitfast.measure.workloads import sampler
    run = sampler(preset, 256, steps, 1, "eager", torch.device("cpu"), 2.9, (0.1, 1.0), method,
                  schedule, dtype=torch.bfloat16, backend="triton")  # as "auto" on CUDA
    with torch.no_grad():
        run()


def pmf_training(preset):
    from jitfast.measure.workloads import pmf_loss_step
    with torch.autocast("cpu", torch.bfloat16):  # as CUDA autocast runs it
        # two examples: one flow-matching, one guided (the v-head pass over 2B + B/2)
        pmf_loss_step(preset, 256, 2, torch.device("cpu"), backend="triton", depth=2,
                      head_depth=1)[0]()


def pmf_sampling(preset):
    from jitfast.measure.workloads import pmf_sampler
    run = pmf_sampler(preset, 256, 1, 1, "eager", torch.device("cpu"), dtype=torch.bfloat16,
                      backend="triton", depth=2, head_depth=1)
    with torch.no_grad():
        run()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["JiT-B/16", "JiT-L/16", "JiT-H/16"])
    p.add_argument("--pmf-presets", nargs="*", default=["pMF-B/16", "pMF-H/16"])
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    compiler = Compiler()
    offline.intercept(args.arch, compiler.launch, on_tune=compiler.tuning_keys.add,
                      every_config=True)
    _common.INTERPRET = True  # use_kernel: CPU tensors go to the kernels
    torch.set_num_threads(os.cpu_count())
    work = [(f"train step {preset}", training, (preset,)) for preset in args.presets]
    # Heun's kinds of evaluation (unguided, guided, Heun's second) all occur within 3 steps
    work += [("sampling JiT-B/16 heun", sampling, ("JiT-B/16", "heun", 3, "linear")),
             ("sampling JiT-B/16 unipc2 cosine", sampling, ("JiT-B/16", "unipc2", 4, "cosine"))]
    work += [(f"sampling {preset} 1 step", pmf_sampling, (preset,)) for preset in args.pmf_presets]
    work += [(f"objective {preset}", pmf_training, (preset,)) for preset in args.pmf_presets[:1]]
    for name, fn, fn_args in work:
        start = time.perf_counter()
        fn(*fn_args)
        print(f"{name}: {time.perf_counter() - start:.1f} s; so far {compiler.summary()}",
              flush=True)
    print(f"in all: {compiler.summary()} for sm_{args.arch} "
          f"(cache: {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')})")


if __name__ == "__main__":
    main()
