"""Every kernel variant compiles with Triton's real compiler (to an sm_90 cubin), without a GPU.

The interpreter runs kernels as numpy code, so it accepts some programs the compiler rejects;
this closes that gap on CPU machines. A subprocess (no TRITON_INTERPRET) turns every launch into
a compile for the target (``jitfast.kernels.offline``), of each autotune config, and calls every
registered op on the opcheck cases in float32 and bfloat16, then runs pMF's sampler as
PMFSampler does (1 and 2 guided steps, the update in the head) and its network's plain forward,
for a tiny PMF and one of pMF-B/16's geometry, and compiles what they launch: the norms with
stride-0 gates, shifts and scales, the patch embedding with its positions at an offset into the
table, the head with the pMF grid's time slices. The bf16 Triton matmuls must compile to
Hopper's tensor-core instructions (wgmma), every config.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")

ARCH = 90  # H100 / H200
# Triton matmuls that replace cuBLAS's: in bf16 every config must run on Hopper's wgmma (a tile
# or layout it cannot take falls back to mma.sync, several times slower)
TENSOR_CORE_MATMULS = ("_swiglu_matmul_fwd", "_swiglu_matmul_bwd")
SHARDS = 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile them")
@pytest.mark.skipif(not triton.__version__.startswith("3."),
                    reason="the compile-only driver relies on Triton 3 internals")
def test_every_kernel_compiles_for_sm90():
    """Two subprocesses, each compiling its share of the cases: compiling is single-threaded and
    the test machines have two cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = [subprocess.Popen([sys.executable, __file__, str(ARCH), str(shard), str(SHARDS)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for shard in range(SHARDS)]
    outputs = [shard.communicate(timeout=900) for shard in shards]
    for shard, (stdout, stderr) in zip(shards, outputs):
        assert shard.returncode == 0, stderr[-5000:]
        assert "kernel variants compiled" in stdout, stdout
    matmuls = [line.split()[-2:] for stdout, _ in outputs for line in stdout.splitlines()
               if line.startswith("bf16 matmul:")]
    from jitfast.kernels import swiglu_matmul
    assert len(matmuls) >= len(swiglu_matmul.FWD_CONFIGS) + len(swiglu_matmul.BWD_CONFIGS)
    assert {name for name, _ in matmuls} == set(TENSOR_CORE_MATMULS)
    assert all(found == "wgmma" for _, found in matmuls), matmuls
    # pMF reached the kernels (not the reference), the sampler's fused head among them
    stdout = outputs[0][0]
    pmf_kernels = stdout.split("pMF launched: ")[1].split()
    assert set(pmf_kernels) == {"_output_head_fwd", "_patch_embed_fwd", "_qk_norm_rope_fwd",
                                "_residual_norm_fwd", "_swiglu_matmul_fwd"}, stdout


def pmf_runs():
    """pMF's inference as PMFSampler runs it, and its network's u, on a tiny PMF and one of
    pMF-B/16's geometry (two blocks: every block launches the same variants): a bf16 network
    (as jitfast.sample runs it on CUDA) and a float32 one; the tiny one also float32 under bf16
    autocast, and at batch 1 and 16. B/16 at batch 1 only: batches 3 and 16 were found to launch
    no variant beyond batch 1's."""
    from jitfast import PMF
    from jitfast.diffusion.pmf_sampler import PMFTimeGrid, integrate_pmf
    from jitfast.network.pmf_presets import pmf_preset_config

    tiny = dict(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, head_depth=1,
                bottleneck_dim=8)
    b16 = {**pmf_preset_config("pMF-B/16"), "depth": 2, "head_depth": 1}
    modes = [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
    for config, batches, dtypes in ((tiny, (1, 16), modes), (b16, (1,), modes[:2])):
        torch.manual_seed(0)
        net = PMF(**config, num_classes=10, backend="triton").eval()
        net.check_values = False  # as PMFSampler.run sets it
        for dtype, autocast in dtypes:
            net.to(dtype)
            for batch in batches:
                y = torch.randint(10, (batch,))
                z = torch.randn(batch, 3, net.input_size, net.input_size)
                guidance = [torch.full((1,), v) for v in (7.5, 0.1, 0.8)]
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    for steps in (1, 2):
                        integrate_pmf(net, y, z, PMFTimeGrid.make(steps, z.device), guidance)
                    ones = torch.ones(batch)
                    net(z, ones, ones, *(g.expand(batch) for g in guidance), y)


def compile_everything(arch, shard=0, shards=1):
    """Compile the variants of every `shards`-th opcheck case from `shard` on, in float32 and
    bfloat16, and (shard 0) pMF's runs."""
    from jitfast.kernels import offline

    variants, launched = set(), set()

    def compile_new(kernel, args, kwargs):
        key = offline.variant_key(kernel, args, kwargs)
        launched.add(key)
        if key not in variants:
            variants.add(key)
            compiled = offline.compile_variant(kernel, args, kwargs)
            if kernel.fn.__name__ in TENSOR_CORE_MATMULS and args[0].dtype == torch.bfloat16:
                wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
                print("bf16 matmul:", kernel.fn.__name__, "wgmma" if wgmma else "no-wgmma")

    offline.intercept(arch, compile_new, every_config=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import test_kernels_ops as cases

    for dtype in (torch.float32, torch.bfloat16):
        for op, args in cases.opcheck_cases()[shard::shards]:
            op(*(a.to(dtype) if torch.is_tensor(a) else a for a in args))
    opchecked = len(variants)
    if shard:
        print(f"{opchecked} kernel variants compiled for sm_{arch}")
        return
    launched.clear()
    from jitfast.kernels import _common
    _common.INTERPRET = True  # use_kernel: the model's CPU tensors go to the (compiled) kernels
    pmf_runs()
    print(f"{len(variants)} kernel variants compiled for sm_{arch}, "
          f"{len(variants) - opchecked} of them new in pMF's {len(launched)}")
    print("pMF launched:", *sorted({name for name, _ in launched}))


if __name__ == "__main__":
    compile_everything(*map(int, sys.argv[1:]))
