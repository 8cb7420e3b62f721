"""Run folders: the lock, run identity and refusals, pruning, crash-safe metrics, progress lines,
and the `python -m jitfast.*` entry points without runpy's warning."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from jitfast.training.progress import MetricsLog, Progress, read_metrics
from jitfast.training.runfolder import FolderLock, RunFolderError, TrainingFolder
from jitfast.util.files import WriteError, atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_checkpoint(folder, step, run_id):
    """A file with the entries the folder logic reads (the real ones are in test_faults.py)."""
    path = os.path.join(folder, f"checkpoint-{step:08d}.pt")
    torch.save({"step": step, **({"run_id": run_id} if run_id is not None else {})}, path)
    return path


def test_a_second_lock_is_refused_with_its_holder_until_released(tmp_path):
    with FolderLock(str(tmp_path), "python -m jitfast.train --out x"):
        with pytest.raises(RunFolderError, match=rf"in use by another process \(pid "
                                                 rf"{os.getpid()} on .* since .* UTC: python -m "
                                                 rf"jitfast.train --out x\)"):
            FolderLock(str(tmp_path), "second")
    FolderLock(str(tmp_path), "third").release()  # released: free again


def test_the_lock_of_a_killed_process_needs_no_cleaning(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{}'); print(flush=True); time.sleep(60)"),
        str(tmp_path / ".lock")], stdout=subprocess.PIPE)
    holder.stdout.readline()  # it holds the lock now
    with pytest.raises(RunFolderError, match="in use by another process"):
        FolderLock(str(tmp_path), "while it lives")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".lock").exists()  # its file stays; its lock went with it
    FolderLock(str(tmp_path), "after its death").release()


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A forked child (a DataLoader worker) shares its parent's lock descriptor; it lets go of
    it, so the lock ends with the parent even while orphaned children live on."""
    lock = FolderLock(str(tmp_path), "parent")
    started_r, started_w = os.pipe()
    child = os.fork()
    if child == 0:  # the fork's hooks have run by now
        os.write(started_w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(started_r, 1)
        lock.release()
        FolderLock(str(tmp_path), "next").release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started_r)
        os.close(started_w)


def test_the_lock_holder_removes_temporaries_of_killed_writers(tmp_path):
    (tmp_path / "images").mkdir()
    stale = [tmp_path / "checkpoint-00000004.pt.tmp-12", tmp_path / "images" / "000001.png.tmp-7"]
    ours = tmp_path / f"samples.npz.tmp-{os.getpid()}"
    for path in stale + [ours, tmp_path / "notes.tmp-x"]:
        path.write_bytes(b"half")
    FolderLock(str(tmp_path), "cmd").release()
    assert not any(p.exists() for p in stale) and ours.exists()
    assert (tmp_path / "notes.tmp-x").exists()  # not a temporary of ours


def test_a_new_run_is_refused_a_folder_holding_a_run_unless_overwriting(tmp_path):
    out = str(tmp_path)
    first = TrainingFolder(out, "first")
    for step in (50, 60):
        fake_checkpoint(out, step, first.run_id)
    MetricsLog(os.path.join(out, "metrics.jsonl")).write(60, loss=0.5)
    first.release()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"holds a run at step 60 \(checkpoints 50, 60; "
                                             r"metrics to step 60\); pass --resume .* to "
                                             r"continue it, --overwrite to delete it"):
        TrainingFolder(out, "second")
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-00000050.pt",
                                       "checkpoint-00000060.pt", "metrics.jsonl", "notes.txt",
                                       "train-run.json"]
    second = TrainingFolder(out, "second", overwrite=True)
    assert second.run_id != first.run_id
    assert sorted(os.listdir(out)) == [".lock", "notes.txt", "train-run.json"]  # the user's
    assert json.loads((tmp_path / "train-run.json").read_text())["run_id"] == second.run_id
    second.release()


def test_a_failed_start_leaves_nothing_that_blocks_the_retry(tmp_path):
    TrainingFolder(str(tmp_path), "bad data path").release()  # as if it failed before any step
    TrainingFolder(str(tmp_path), "fixed").release()


def test_resume_is_refused_another_runs_folder_and_later_checkpoints(tmp_path):
    theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
    with TrainingFolder(theirs, "a") as a:
        fake_checkpoint(theirs, 10, a.run_id)
    with TrainingFolder(ours, "b") as b:
        mine = fake_checkpoint(ours, 10, b.run_id)
        fake_checkpoint(ours, 20, b.run_id)
    with pytest.raises(RunFolderError, match=rf"holds run {b.run_id} at step 20 .*, not the run "
                                             rf"of .*theirs"):
        TrainingFolder(ours, "c", resume=os.path.join(theirs, "checkpoint-00000010.pt"))
    with pytest.raises(RunFolderError, match=r"checkpoints of this run after step 10 \(steps "
                                             r"20\)"):
        TrainingFolder(ours, "d", resume=mine)
    # into a fresh folder, a resumed run keeps its id
    with TrainingFolder(str(tmp_path / "branch"), "e", resume=mine) as branch:
        assert branch.run_id == b.run_id


def test_pruning_deletes_only_this_runs_older_checkpoints_and_their_siblings(tmp_path):
    out = str(tmp_path)
    with TrainingFolder(out, "old") as old:
        fake_checkpoint(out, 5, old.run_id)
    folder = TrainingFolder(out, "resumed", resume=os.path.join(out, "checkpoint-00000005.pt"))
    legacy = fake_checkpoint(out, 1, None)  # written before run ids: nobody's to delete
    foreign = fake_checkpoint(out, 2, "someone-else")
    for step in (10, 20, 30):
        fake_checkpoint(out, step, folder.run_id)
    (tmp_path / "checkpoint-00000010.safetensors").write_bytes(b"w")
    (tmp_path / "checkpoint-00000020.safetensors").write_bytes(b"w")
    newest = fake_checkpoint(out, 25, folder.run_id)  # just written, below an older step 30
    folder.prune(2, newest)
    assert sorted(os.listdir(out)) == [".lock", os.path.basename(legacy),
                                       os.path.basename(foreign), "checkpoint-00000025.pt",
                                       "checkpoint-00000030.pt", "train-run.json"]
    folder.prune(0, newest)
    assert "checkpoint-00000025.pt" in os.listdir(out)  # never the one just written
    folder.release()


def test_metrics_survive_a_torn_line_and_resume_without_truncation(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, tensorboard=False)
    for step in (1, 2, 3, 4):
        log.write(step, loss=step / 10)
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "lo')  # a write cut short by a crash
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    size = os.path.getsize(path)
    log = MetricsLog(path, resumed_from=2, tensorboard=False)
    log.write(3, loss=0.33)
    log.close()
    with open(path, "rb") as f:
        assert f.read(size) == open(path, "rb").read()[:size]  # appended, nothing truncated
    lines = open(path).read().splitlines()
    assert lines[4] == '{"step": 5, "lo'  # the torn line stays one line of its own
    assert all(json.loads(line) for i, line in enumerate(lines) if i != 4)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.1), (2, 0.2),
                                                                   (3, 0.33)]


def test_failed_writes_name_the_file_and_keep_the_previous_one(tmp_path):
    path = tmp_path / "c.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*c.bin: No space left on device "
                                         r"\(ENOSPC\)"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.bin"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        progress = Progress(10, first=2, stream=stream)
        for step in (4, 6):
            progress.update(step, loss=0.123456, **{"img/s": 31.0})
        progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[1].startswith("step 6/10 [") and lines[1].endswith(", loss=0.123, img/s=31]")
    assert "\r" in terminal.getvalue() and "6/10" in terminal.getvalue()


def test_entry_points_run_without_runpys_warning():
    """runpy warns when `python -m jitfast.X` finds jitfast.X imported by the package already
    (jitfast.export is, on purpose: jitfast/__init__.py exports the function and filters it)."""
    entry_points = ["jitfast.train", "jitfast.sample", "jitfast.prepare", "jitfast.bench",
                    "jitfast.experiments.targets", "jitfast.experiments.toy"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    check = subprocess.Popen([sys.executable, "-c", (
        "import sys, jitfast, jitfast.experiments; "
        f"print([m for m in {entry_points} if m in sys.modules])")], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, text=True)
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "jitfast.sample",
                          "--help"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "RuntimeWarning" not in run.stderr, run.stderr
    assert check.communicate()[0].strip() == "[]"
