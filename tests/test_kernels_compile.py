"""Every kernel variant compiles with Triton's real compiler (to an sm_90 cubin), without a GPU.

The interpreter runs kernels as numpy code, so it accepts some programs the compiler rejects;
this closes that gap on CPU machines. A subprocess (no TRITON_INTERPRET) turns every launch into
a compile for the target (``jitfast.kernels.offline``), of each autotune config, and calls every
registered op on the opcheck cases in float32 and bfloat16.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need Triton")

ARCH = 90  # H100 / H200


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile them")
@pytest.mark.skipif(not triton.__version__.startswith("3."),
                    reason="the compile-only driver relies on Triton 3 internals")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, str(ARCH)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "kernel variants compiled" in result.stdout, result.stdout


def compile_everything(arch):
    from jitfast.kernels import offline

    variants = set()

    def compile_new(kernel, args, kwargs):
        key = offline.variant_key(kernel, args, kwargs)
        if key not in variants:
            variants.add(key)
            offline.compile_variant(kernel, args, kwargs)

    offline.intercept(arch, compile_new, every_config=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import test_kernels_ops as cases

    for dtype in (torch.float32, torch.bfloat16):
        for op, args in cases.opcheck_cases():
            op(*(a.to(dtype) if torch.is_tensor(a) else a for a in args))
    print(f"{len(variants)} kernel variants compiled for sm_{arch}")


if __name__ == "__main__":
    compile_everything(int(sys.argv[1]))
