"""Parity of jitfast's PMF with the official pMF PyTorch port at every preset's real shapes, on
the CPU in float32: the network's u and 1- and 2-step generate from the same noise, with every
weight away from its zero init (the gates and the final layer random, the rest the official
init). Needs the port in .official-pmf/ (benchmarks/official_pmf.sh).

    python benchmarks/pmf_parity.py [--presets pMF-B/16 ...] [--out benchmarks/results/F.json]
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jitfast import PMFSampler  # noqa: E402
from jitfast.io.pmf_weights import pmf_model_from_state  # noqa: E402
from jitfast.network.pmf_presets import PMF_SAMPLING  # noqa: E402

BATCH = 2


class FixedNoise:
    def __init__(self, z0):
        self.z0 = z0

    def randn(self, shape):
        return self.z0.clone()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def lively(model, generator):
    """The zero-initialised parameters (gates, final layer) made random."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_scale", "mlp_scale")):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif "final_layer.linear" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return model


def check(name, pmf_module):
    arch, patch = name[len("pMF-"):].split("/")
    size = 16 * int(patch)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    official = lively(pmf_module.pixelMeanFlow(f"pmfDiT_{arch}_{patch}", img_size=size),
                      generator).eval()
    ours = pmf_model_from_state(official.state_dict(), backend="torch")
    scale, omega, (t_min, t_max) = PMF_SAMPLING[name]
    assert official.noise_scale == scale
    z = torch.randn(BATCH, 3, size, size, generator=generator)
    y = torch.tensor([207, 1000])[:BATCH]
    t, h = torch.tensor([1.0, 0.7]), torch.tensor([1.0, 0.4])
    guidance = [torch.full((BATCH,), v) for v in (omega, t_min, t_max)]
    row = {"preset": name, "params": sum(p.numel() for p in ours.parameters())}
    with torch.no_grad():
        want = official.u_fn(z, t, h, *guidance, y)[0]
        row["u"] = rel_err(ours(z, t, h, *guidance, y), want)
        sampler = PMFSampler(ours)
        for steps in (1, 2):
            start = time.perf_counter()
            want = official.generate(BATCH, FixedNoise(z), steps, omega, t_min, t_max, labels=y)
            row[f"official_{steps}step_s"] = time.perf_counter() - start
            got = sampler.generate(y, steps, z0=z)
            row[f"generate_{steps}"] = rel_err(got, want)
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=list(PMF_SAMPLING))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, ".official-pmf"))
    import pmf
    rows = []
    print("| preset | parameters | u | 1-step generate | 2-step generate |")
    print("|---|---|---|---|---|")
    for name in args.presets:
        row = check(name, pmf)
        rows.append(row)
        print(f"| {name} | {row['params'] / 1e6:.0f} M | {row['u']:.1e} | "
              f"{row['generate_1']:.1e} | {row['generate_2']:.1e} |", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"torch": torch.__version__, "official_commit": open(
                    os.path.join(ROOT, ".official-pmf", "COMMIT")).read().strip(),
                    "rows": rows}, f, indent=1)
    if any(max(r["u"], r["generate_1"], r["generate_2"]) > 1e-5 for r in rows):
        raise SystemExit("parity above 1e-5")


if __name__ == "__main__":
    main()
