"""Faults injected for real into `python -m jitfast.train` and `python -m jitfast.sample`:
SIGKILL at seeded moments (some in the middle of a save), two processes into one folder, a new
run into an old run's folder, writes past a file-size limit (RLIMIT_FSIZE).

Each run is a process of its own, forked from a forkserver that imported jitfast once, so a
start costs milliseconds instead of a torch import. A kill "during a save" is exact: the test
puts a FIFO where the save's temporary file will be (``<file>.tmp-<pid>``, see
``jitfast.util.files.atomic_write``), reads a seeded number of bytes of the file being written from
it, and kills the writer, blocked mid-write."""
import fcntl
import functools
import hashlib
import multiprocessing
import os
import random
import resource
import signal
import sys
import time

import numpy as np
import pytest
import torch
from test_sample_cli import lively_net

from jitfast import EMA, Denoiser, read_checkpoint, save_checkpoint
from jitfast.training.progress import read_metrics

CONTEXT = multiprocessing.get_context("forkserver")
# torch._dynamo: imported by every AdamW() (4 s), once here
CONTEXT.set_forkserver_preload(["jitfast.train", "jitfast.sample", "torch._dynamo"])
ROUNDS = int(os.environ.get("JITFAST_FAULT_ROUNDS", 1))  # of 4 kills each; more for a soak
SEED = int(os.environ.get("JITFAST_FAULT_SEED", 18))  # of the moments of the kills
STEPS = 6 * ROUNDS + 6  # a round moves the killed run on by 2 checkpoints
TRAIN = ["--model", "JiT-T/tiny", "--image-size", "16", "--batch-size", "4",
         "--steps", str(STEPS),
         "--ckpt-every", "3", "--log-every", "1", "--warmup-steps", "2", "--sample-steps", "2",
         "--samples-per-class", "1", "--grid-classes", "2", "--device", "cpu", "--cpu-threads",
         "1", "--num-workers", "0"]
# a round's 3 kills move a run on by at most 12 images: 6 images (3 batches, > 100 ms) are left
SAMPLE = ["--classes", "0,1,2,3,4,5", "--num-per-class", str(3 * ROUNDS), "--batch", "2",
          "--steps", "12",
          "--cfg", "2.0", "--interval", "0.0", "1.0", "--device", "cpu"]
DEADLINE_S = 120  # per process: a hung child fails the test instead of the suite


def entry(module, argv, log, file_size_limit):
    """The child: its output into `log`, an optional file-size limit, then the CLI itself.
    JiT-T/tiny, a preset of this test's (2 blocks of width 64, 4 MB checkpoints instead of
    84 MB), keeps the saves short: the faults are under test here, not the model."""
    from jitfast.network.presets import JiT_models, build
    JiT_models["JiT-T/tiny"] = functools.partial(build, "JiT-T/8", depth=2, hidden_size=64,
                                                 num_heads=2, bottleneck_dim=16,
                                                 in_context_len=4, in_context_start=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    if file_size_limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    sys.argv = [module, *argv]
    if module == "jitfast.train":
        from jitfast.train import cli
        cli()
    else:
        from jitfast.sample import main
        main(argv)


class Run:
    def __init__(self, module, argv, log, file_size_limit=None):
        self.log = str(log)
        self.process = CONTEXT.Process(target=entry,
                                       args=(module, argv, self.log, file_size_limit))
        self.process.start()
        self.pid = self.process.pid

    def alive(self):
        return self.process.is_alive()

    def kill(self):
        assert self.alive(), "the fault was planned inside the run, which had ended"
        os.kill(self.pid, signal.SIGKILL)
        return self.wait() == -9

    def wait(self):
        self.process.join(DEADLINE_S)
        if self.process.exitcode is None:
            self.process.kill()
            pytest.fail(f"a run did not end within {DEADLINE_S} s; its log: {self.output()}")
        return self.process.exitcode

    def output(self):
        with open(self.log) as f:
            return f.read()


def wait_for(condition, run, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert run.alive(), f"the run ended before {what}: {run.output()}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.005)


def kill_mid_write(run, path, nbytes):
    """Kill `run` after it wrote `nbytes` of `path` (through a FIFO at its temporary)."""
    fifo = f"{path}.tmp-{run.pid}"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)  # the writer blocks 4 kB ahead of the reader
    read = 0
    try:
        def enough():
            nonlocal read
            try:
                while read < nbytes:
                    chunk = os.read(fd, min(1 << 16, nbytes - read))
                    if not chunk:  # no writer yet
                        break
                    read += len(chunk)
            except BlockingIOError:
                pass
            return read >= nbytes
        wait_for(enough, run, f"{nbytes} bytes of {os.path.basename(path)}")
        return run.kill()
    finally:
        os.close(fd)


def start_while_paused(first, out, module, argv, tmp_path):
    """Start a second run into `out` while `first`, which holds it, is paused (SIGSTOP): the
    second surely meets the first's lock, however fast the first would have finished. (The
    first holds the lock once it wrote train-run.json, or the sampler's run.json.)"""
    claimed = ("train-run.json" if module == "jitfast.train" else "run.json")
    wait_for(lambda: os.path.exists(os.path.join(out, claimed)), first, "the folder's claim")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = Run(module, argv, tmp_path / "second.log")
        second.wait()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    return second


def latest_step(folder):
    steps = [int(n[len("checkpoint-"):-3]) for n in os.listdir(folder) if n.endswith(".pt")]
    return max(steps, default=0)


def logged_step(folder):
    path = os.path.join(folder, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    return records[-1]["step"] if records else 0


def weights(path):
    ckpt = read_checkpoint(path)
    return {k: ckpt[k] for k in ("model", "model_ema1", "model_ema2")}


def assert_bit_equal(a, b):
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != ".lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted training run."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    run = Run("jitfast.train", TRAIN + ["--out", out], out + ".log")
    assert run.wait() == 0, run.output()
    return out


def test_training_killed_at_seeded_moments_resumes_bit_for_bit(reference, tmp_path):
    """Per round, two kills at random moments of the steps and two in the middle of writing a
    checkpoint; each time the same command with --resume goes on. The final weights and both
    EMAs equal the uninterrupted run's, and so does the metrics log."""
    rng = random.Random(SEED)
    out, kills = str(tmp_path / "run"), []
    os.makedirs(out)
    for fault in ("step", "save", "step", "save") * ROUNDS:
        start = latest_step(out)
        run = Run("jitfast.train", TRAIN + ["--out", out] + (["--resume", out] if start else []),
                  tmp_path / "log")
        if fault == "save":  # the next checkpoint, cut after a seeded number of bytes
            nbytes = rng.randint(1, 3_000_000)  # of 4 MB
            kills.append(("save", start + 3, nbytes,
                          kill_mid_write(run, os.path.join(out, f"checkpoint-{start + 3:08d}.pt"),
                                         nbytes)))
        else:  # a seeded step past the next checkpoint, then a seeded fraction of a step
            target, delay = start + rng.randint(4, 5), rng.uniform(0, 0.02)
            wait_for(lambda: logged_step(out) >= target, run, f"step {target}")
            time.sleep(delay)
            kills.append(("step", target, round(delay, 3), run.kill()))
    run = Run("jitfast.train", TRAIN + ["--out", out, "--resume", out], tmp_path / "log")
    assert run.wait() == 0, run.output()
    print("kills (fault, step, bytes or delay, killed):", kills)
    assert [k[-1] for k in kills] == [True] * 4 * ROUNDS
    assert sorted(os.listdir(out)) == [".lock", f"checkpoint-{STEPS - 3:08d}.pt",
                                       f"checkpoint-{STEPS - 3:08d}.safetensors",
                                       f"checkpoint-{STEPS:08d}.pt",
                                       f"checkpoint-{STEPS:08d}.safetensors", "metrics.jsonl",
                                       f"samples-{STEPS:08d}.png",
                                       "train-run.json"]  # no temporary left behind
    assert_bit_equal(weights(os.path.join(out, f"checkpoint-{STEPS:08d}.pt")),
                     weights(os.path.join(reference, f"checkpoint-{STEPS:08d}.pt")))
    losses = [[r["loss"] for r in read_metrics(os.path.join(folder, "metrics.jsonl"))]
              for folder in (out, reference)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


def test_a_new_run_into_an_old_runs_folder_is_refused_and_the_old_run_stays(reference,
                                                                             tmp_path):
    before = digests(reference)
    run = Run("jitfast.train", TRAIN + ["--out", reference, "--steps", "2", "--seed", "1"],
              tmp_path / "log")
    assert run.wait() == 1
    assert f"error: '{reference}' holds a run at step {STEPS} (checkpoints {STEPS - 3}, " \
           f"{STEPS}; metrics to step {STEPS}); pass --resume {reference} to continue it, " \
           f"--overwrite to delete it, or another --out" in run.output()
    assert digests(reference) == before


def test_two_trainings_into_one_folder_the_second_is_refused(tmp_path):
    out = str(tmp_path / "shared")
    first = Run("jitfast.train", TRAIN + ["--out", out], tmp_path / "first.log")
    second = start_while_paused(first, out, "jitfast.train", TRAIN + ["--out", out, "--seed",
                                                                     "2"], tmp_path)
    assert second.wait() == 1
    assert f"error: '{out}' is in use by another process (pid {first.pid} on " in second.output()
    assert first.wait() == 0, first.output()
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == \
        list(range(1, STEPS + 1))
    assert read_checkpoint(os.path.join(out, f"checkpoint-{STEPS:08d}.pt"))["args"]["seed"] == 0


def test_a_checkpoint_write_past_the_file_size_limit_fails_cleanly(tmp_path):
    """RLIMIT_FSIZE below a checkpoint's size: the save fails with the file's name and the
    system's reason, the previous checkpoint stays intact; then a limit that cuts a metrics
    line: named too, and the log stays readable."""
    out = str(tmp_path / "run")
    run = Run("jitfast.train", TRAIN + ["--out", out, "--steps", "3"], tmp_path / "log")
    assert run.wait() == 0, run.output()
    before = digests(out)
    del before["metrics.jsonl"]
    resume = TRAIN + ["--out", out, "--resume", out, "--steps", "6"]
    run = Run("jitfast.train", resume, tmp_path / "limited.log", file_size_limit=1_000_000)
    assert run.wait() == 1
    message = run.output().splitlines()[-1]
    print(message)
    # the weights are written first, then the .pt
    assert message == (f"error: cannot write {out}/checkpoint-00000006.safetensors: "
                       f"File too large (EFBIG)")
    assert {k: v for k, v in digests(out).items() if k != "metrics.jsonl"} == before
    assert read_checkpoint(os.path.join(out, "checkpoint-00000003.pt"))["step"] == 3
    metrics = os.path.join(out, "metrics.jsonl")
    run = Run("jitfast.train", resume, tmp_path / "cut.log",
              file_size_limit=os.path.getsize(metrics) + 40)
    assert run.wait() == 1
    message = run.output().splitlines()[-1]
    print(message)
    assert message.startswith(f"error: cannot write {metrics}: only ")
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]  # resumed from 3, torn 4


@pytest.fixture(scope="module")
def sampling(tmp_path_factory):
    """A checkpoint and the .npz of its uninterrupted sampling run."""
    root = tmp_path_factory.mktemp("sampling")
    denoiser = Denoiser(lively_net())
    ckpt = str(root / "checkpoint.pth")
    save_checkpoint(ckpt, denoiser, EMA(denoiser), args={"noise_scale": 1.0})
    argv = ["--ckpt", ckpt, *SAMPLE]
    run = Run("jitfast.sample", argv + ["--out", str(root / "full")], root / "log")
    assert run.wait() == 0, run.output()
    return argv, np.load(root / "full" / "samples.npz")


def test_sampling_killed_at_seeded_moments_gives_the_same_npz(sampling, tmp_path):
    argv, full = sampling
    rng = random.Random(SEED)
    out, kills = str(tmp_path / "out"), []
    os.makedirs(out)
    images = os.path.join(out, "images")
    for fault in ("image", "image", "image") * ROUNDS + ("npz",):
        run = Run("jitfast.sample", argv + ["--out", out], tmp_path / "log")
        if fault == "npz":
            nbytes = rng.randint(1, 30_000)  # of 55 kB
            kills.append(("npz", nbytes, kill_mid_write(run, os.path.join(out, "samples.npz"),
                                                        nbytes)))
            continue
        done = len(os.listdir(images)) if os.path.isdir(images) else 0
        target, delay = rng.randint(done + 1, done + 3), rng.uniform(0, 0.02)
        wait_for(lambda: os.path.isdir(images) and len([n for n in os.listdir(images)
                                                        if n.endswith(".png")]) >= target,
                 run, f"{target} images")
        time.sleep(delay)
        kills.append(("image", target, round(delay, 3), run.kill()))
    run = Run("jitfast.sample", argv + ["--out", out], tmp_path / "log")
    assert run.wait() == 0, run.output()
    print("kills (fault, images or bytes, delay, killed):", kills)
    assert [k[-1] for k in kills] == [True] * (3 * ROUNDS + 1)
    resumed = np.load(os.path.join(out, "samples.npz"))
    assert np.array_equal(resumed["arr_0"], full["arr_0"])
    assert np.array_equal(resumed["arr_1"], full["arr_1"])
    assert sorted(os.listdir(images)) == [f"{i:06d}.png" for i in range(18 * ROUNDS)]
    assert not [name for name in os.listdir(out) if ".tmp-" in name]  # the FIFO went too


def test_two_samplers_into_one_folder_and_a_write_past_the_size_limit(sampling, tmp_path):
    argv, full = sampling
    out = str(tmp_path / "out")
    first = Run("jitfast.sample", argv + ["--out", out], tmp_path / "first.log")
    second = start_while_paused(first, out, "jitfast.sample", argv + ["--out", out], tmp_path)
    assert second.wait() == 1
    assert f"error: '{out}' is in use by another process (pid {first.pid} on " in second.output()
    assert first.wait() == 0
    npz = os.path.join(out, "samples.npz")
    before = open(npz, "rb").read()
    os.remove(os.path.join(out, "images", "000011.png"))  # one image to redo, then the npz
    run = Run("jitfast.sample", argv + ["--out", out], tmp_path / "limited.log",
              file_size_limit=len(before) - 1)
    assert run.wait() == 1
    message = run.output().splitlines()[-1]
    print(message)
    assert message == f"error: cannot write {npz}: File too large (EFBIG)"
    assert open(npz, "rb").read() == before
    assert np.array_equal(np.load(npz)["arr_0"], full["arr_0"])
