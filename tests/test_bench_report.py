"""The benchmark arithmetic (FLOPs, MFU, speedups, epoch time) and the report's table."""
import json

import pytest

from jitfast.bench import main
from jitfast.measure.report import report
from jitfast.measure.throughput import (IMAGENET_IMAGES, forward_flops, forward_macs, peak_tflops,
                                        throughput)


def test_jit_b16_forward_is_about_25_gmac_per_image():
    assert forward_flops("JiT-B/16", 256) == pytest.approx(2 * 25e9, rel=0.02)


def test_forward_macs_by_hand_for_a_one_block_model():
    # 4 patches of 1·2·2 = 4 numbers, bottleneck 2, D 4, SwiGLU hidden int(16·2/3) = 10,
    # one block over 4 patches + 1 in-context token
    macs = forward_macs(depth=1, hidden_size=4, num_heads=1, bottleneck_dim=2, in_context_len=1,
                        in_context_start=0, patch_size=2, input_size=4, in_channels=1)
    n = 5
    block = n * (3 * 16 + 16 + 2 * 4 * 10 + 10 * 4) + 2 * n * n * 4 + 6 * 16
    assert macs == 4 * (4 * 2 + 2 * 4) + block + 4 * 4 * 4 + 2 * 16


def test_attention_grows_with_the_square_of_the_tokens():
    small, big = (forward_flops("JiT-B/16", size) for size in (256, 512))
    assert 4 < big / small < 5  # 4x tokens: linear layers 4x, attention 16x


def test_throughput_mfu_and_speedup():
    out = throughput(0.5, images=100, flops=989e12 * 0.25, device_name="NVIDIA H100 80GB HBM3",
                     baseline_seconds=1.0)
    assert out["images_per_s"] == 200
    assert out["tflops"] == pytest.approx(989 * 0.5)
    assert out["mfu"] == pytest.approx(0.5)
    assert out["speedup"] == 2.0


def test_bandwidth_against_the_card_peak():
    out = throughput(1e-3, images=1, flops=0, device_name="NVIDIA H100 80GB HBM3",
                     traffic=2.68e9)
    assert out["gb_per_s"] == pytest.approx(2680) and out["hbm_fraction"] == pytest.approx(0.8)
    assert throughput(1e-3, 1, 0, "NVIDIA H100 PCIe", traffic=1e9)["hbm_fraction"] == 0.5
    cpu = throughput(1e-3, 1, 0, "x86_64", traffic=1e9)
    assert cpu["gb_per_s"] == pytest.approx(1000) and cpu["hbm_fraction"] is None


def test_no_mfu_without_a_known_peak():
    assert peak_tflops("x86_64") is None
    assert peak_tflops("NVIDIA H200") == 989.0
    out = throughput(2.0, images=4, flops=8e12, device_name="x86_64")
    assert out["mfu"] is None and out["speedup"] is None and out["tflops"] == 4


def bench(group, variant, seconds, kind="train", images_per_s=None, gb_per_s=None):
    info = dict(device="NVIDIA H100", torch="2.x", triton="3.6", cuda="13.0", kind=kind,
                variant=variant, preset="JiT-B/16", shape="128x256px", dtype="bfloat16",
                seconds=seconds, images_per_s=images_per_s, tflops=None, mfu=0.4, speedup=1.5,
                gb_per_s=gb_per_s, hbm_fraction=gb_per_s / 3350 if gb_per_s else None)
    return dict(group=group, name=f"test[{variant}]", extra_info=info)


def test_report_table_and_epoch_time(tmp_path, capsys):
    results = {"benchmarks": [bench("train step JiT-B/16", "triton", 0.1, images_per_s=1000.0),
                              bench("swiglu forward", "triton", 2e-5, kind="kernel",
                                    gb_per_s=2680.0)]}
    text = report(results)
    lines = text.splitlines()
    assert ("| train step JiT-B/16 | triton | JiT-B/16 | 128x256px | bfloat16 | 100 | 1,000 | – "
            "| 40.0% | – | – | 1.50 | – |") in lines
    assert ("| swiglu forward | triton | JiT-B/16 | 128x256px | bfloat16 | 0.02 | – | – "
            "| 40.0% | 2,680 | 80% | 1.50 | – |") in lines
    hours = IMAGENET_IMAGES / 1000 / 3600
    assert lines[-1] == f"- JiT-B/16 triton: 1,000 img/s → {hours:.3g} h"

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    main(["report", str(path)])
    assert capsys.readouterr().out.strip() == text


def test_report_vs_official(tmp_path, capsys):
    """Each row of a group with an "official" row gets the official median over its own;
    rows of other groups get none."""
    results = {"benchmarks": [
        bench("train step JiT-B/16 batch 128", "eager", 0.2),
        bench("train step JiT-B/16 batch 128", "official", 0.3),
        bench("sample JiT-B/16 batch 1", "graphs", 0.5, kind="sample"),
        bench("train step JiT-B/16 batch 128", "triton+graph", 0.08)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    main(["report", str(path)])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| train step") or line.startswith("| sample")]
    assert [(row[1], row[-1]) for row in rows] == [
        ("eager", "1.50 |"), ("official", "1.00 |"), ("triton+graph", "3.75 |"),
        ("graphs", "– |")]


def test_report_of_an_empty_run():
    assert "| benchmark |" in report({"benchmarks": []})



def test_report_reads_the_results_logged_as_they_finish(tmp_path, capsys):
    """The JSON lines of JITFAST_BENCH_LOG (a run killed before pytest-benchmark wrote its JSON)
    give the same table; a line torn by the kill is skipped."""
    results = [bench("train step JiT-B/16", "eager", 0.2), bench("train step JiT-B/16",
                                                                  "triton", 0.1)]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(b) + "\n" for b in results) + '{"group": "sam')
    main(["report", str(path)])
    assert capsys.readouterr().out.strip() == report({"benchmarks": results})
