"""The benchmark plan (JITFAST_BENCH_PLAN): only the planned benchmarks run, in the plan's
order, with '*' as a wildcard and brackets taken literally."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collected(plan_text, tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text(plan_text)
    env = {**os.environ, "JITFAST_BENCH_PLAN": str(plan)}
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode in (0, 5), out.stdout + out.stderr  # 5: nothing collected
    return [line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line]


def test_plan_picks_and_orders(tmp_path):
    names = collected("# the order matters\ntest_sampling[1-graphs]\n\n"
                      "test_sampling[1-eager]  # baseline second\ntest_train_step[*-eager]\n",
                      tmp_path)
    assert names[:2] == ["test_sampling[1-graphs]", "test_sampling[1-eager]"]
    assert len(names) == 3 and names[2].startswith("test_train_step[") \
        and names[2].endswith("-eager]")


def test_plan_brackets_are_literal(tmp_path):
    assert collected("test_sampling[1-e]\n", tmp_path) == []


def test_plan_places_the_official_rows(tmp_path):
    """The official code's rows (benchmarks/test_bench_official.py) are picked by their ids
    whether or not .official/ exists: without it they are skipped when run, not uncollected."""
    names = collected("test_train_step[*-eager]\ntest_official_train_step[*]\n"
                      "test_official_sampling[1]\n", tmp_path)
    assert [name.split("[")[0] for name in names] == [
        "test_train_step", "test_official_train_step", "test_official_sampling"]


def test_gpu_plan_names_existing_benchmarks(tmp_path):
    """Each line of benchmarks/gpu_plan.txt names a benchmark function of the suite (its
    parameters differ on the CPU, so only the names before '[' are checked here)."""
    functions = {name.split("[")[0] for name in collected("*\n", tmp_path)}
    lines = (line.split("#", 1)[0].strip()
             for line in (ROOT / "benchmarks" / "gpu_plan.txt").read_text().splitlines())
    assert {line.split("[")[0] for line in lines if line} <= functions
