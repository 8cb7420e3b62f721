"""The profile's grouping of kernel and operator names, and `python -m jitfast.bench profile`
end to end on a small preset."""
import json

import pytest
import torch

from jitfast.bench import main
from jitfast.measure.profiling import group_of, profile


@pytest.mark.parametrize("name, group", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_residual_norm_bwd", "jitfast residual_norm_bwd"),
    ("_qk_norm_rope_fwd", "jitfast qk_norm_rope_fwd"),
    ("jitfast::swiglu_backward", "jitfast swiglu_backward"),
    ("triton_poi_fused__to_copy_mul_0", "Inductor kernels"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
     "casts and copies"),
    ("aten::_to_copy", "casts and copies"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("void at::native::multi_tensor_apply_kernel<at::native::LerpFunctor<float>>", "EMA"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("aten::aten_to_nothing_known", "other"),
])
def test_group_of_names(name, group):
    assert group_of(name) == group


def test_phase_names_the_group():
    """Inside the optimizer or EMA phase everything belongs to it, whatever the kernel."""
    assert group_of("aten::mul_", "optimizer") == "optimizer"
    assert group_of("aten::mul_", "ema") == "EMA"
    assert group_of("aten::mm", "forward") == "GEMM"


def test_profile_attributes_operator_time_on_the_cpu():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def fn():
        a @ b
        with torch.profiler.record_function("optimizer"):
            a.add(b)

    out = profile("toy", fn, torch.device("cpu"), warmup=1, calls=2)
    assert {"GEMM", "optimizer"} <= set(out.groups)  # and "other": aten::matmul's own time
    assert out.groups["GEMM"][1] == 1 and out.groups["optimizer"][1] == 1
    assert 0 < out.busy_ms <= out.wall_ms
    assert "| GEMM |" in out.table()


def test_profile_command(tmp_path, capsys):
    path = tmp_path / "profile.json"
    main(["profile", "--preset", "JiT-T/4", "--image-size", "16", "--batch", "3",
          "--sample-steps", "2", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "### train step JiT-T/4 16px batch 3 (eager)" in printed
    assert "### sampling JiT-T/4 16px batch 1, 2 Heun steps" in printed
    profiles = json.loads(path.read_text())["profiles"]
    train, sample = profiles
    assert {"GEMM", "attention", "optimizer", "EMA"} <= set(train["groups"])
    assert "optimizer" not in sample["groups"]
    assert all(p["busy_ms"] <= p["wall_ms"] for p in profiles)


def test_a_failing_profile_part_keeps_the_others(tmp_path, capsys, monkeypatch):
    """Each part is printed and saved as soon as it is done; a part that fails is reported,
    the others still run, and the command exits non-zero."""
    import jitfast.measure.workloads

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(jitfast.measure.workloads, "sampler", broken)
    path, markdown = tmp_path / "profile.json", tmp_path / "profile.md"
    with pytest.raises(SystemExit) as exit:
        main(["profile", "--preset", "JiT-T/4", "--image-size", "16", "--batch", "3",
              "--variant", "eager", "--json", str(path),
              "--out", str(markdown)])
    assert exit.value.code == 1
    assert "RuntimeError: capture failed" in capsys.readouterr().out
    names = [p["name"] for p in json.loads(path.read_text())["profiles"]]
    assert names == ["train step JiT-T/4 16px batch 3 (eager)"]
    text = markdown.read_text()
    assert "### train step" in text and "### sampling" in text and "failed" in text


def test_profile_refuses_a_cuda_variant_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA variants run here")
    with pytest.raises(SystemExit):
        main(["profile", "--variant", "triton+graph"])
