"""A run folder belongs to one run.

``FolderLock``: an OS lock (flock) on ``<folder>/.lock`` for a process's whole life; a second
process into the folder is refused at once, told who holds it and since when. The kernel drops
the lock when its holder dies, however it dies: nothing to clean up by hand (the next holder
deletes the half-written temporaries a killed process left).

``TrainingFolder``: what ``jitfast.train`` owns in ``--out``. A run has a random id, kept in
``train-run.json`` beside its checkpoints and in each checkpoint. A new run is refused a folder
that holds another run's checkpoints or metrics (unless told to delete them), a resumed run any
folder but its own, and ``--keep-checkpoints`` prunes only the run's own checkpoints, never the
one just written.
"""
import argparse
import datetime
import fcntl
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys

import torch

from jitfast.io.checkpoint import CheckpointError, read_checkpoint
from jitfast.training.progress import read_metrics
from jitfast.util.files import atomic_write_json

LOCK_NAME = ".lock"
TEMPORARY = re.compile(r"\.tmp-\d+$")
RUN_NAME = "train-run.json"  # not run.json: jitfast.sample's manifest
CHECKPOINT_GLOB = "checkpoint-*.pt"
# what jitfast.train writes into --out: --overwrite deletes exactly these
RUN_FILES = (RUN_NAME, "checkpoint-*", "metrics.jsonl", "samples-*.png", "tensorboard")


class RunFolderError(RuntimeError):
    """A folder held by another process, or holding another run, and what to do about it."""


def command_line(module, argv=None):
    """'python -m <module> <arguments>' of this process (argv: main()'s, when not sys.argv)."""
    return f"python -m {module} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


_HELD = set()  # descriptors of the locks this process holds


def _forget_locks():
    """In a forked child (a DataLoader worker): close the lock descriptors, which share the
    parent's lock, so that the lock goes the moment the parent dies, not when the orphaned
    children notice."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks)


class FolderLock:
    """flock on ``<folder>/.lock`` until ``release()`` (or the process's end); the file says
    who holds it."""

    def __init__(self, folder, command):
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot write to the output folder {folder!r}: "
                                 f"{err.strerror}; choose another --out") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 4096).decode(errors="replace")
            os.close(self.fd)
            raise RunFolderError(f"{folder!r} is in use by another process "
                                 f"({holder_text(holder)}); wait for it to end, or choose "
                                 f"another --out") from None
        _HELD.add(self.fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                          since=now(), command=command)).encode())
        remove_temporaries(folder)

    def release(self):
        if self.fd in _HELD:  # not yet released, nor forgotten in a forked child
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the only descriptor drops the flock
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def remove_temporaries(folder):
    """Delete the half-written files (``<name>.tmp-<pid>``, see ``atomic_write``) that killed
    processes left in `folder` and its subfolders: the lock's holder is the only writer."""
    ours = f".tmp-{os.getpid()}"
    for root in [folder] + [e.path for e in os.scandir(folder) if e.is_dir()]:
        for entry in os.scandir(root):
            if TEMPORARY.search(entry.name) and not entry.name.endswith(ours):
                os.remove(entry.path)


def holder_text(holder):
    """'pid 12 on host h since <time>: <command>' from a lock file's content."""
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "it is starting up"  # it has the lock but has not written its name yet


def step_of(path):
    return int(re.search(r"checkpoint-(\d+)", os.path.basename(path)).group(1))


def peek(path):
    """A checkpoint's entries, its tensors memory-mapped rather than read."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def run_of(path):
    """The run id of one of our checkpoints ('' for one written before run ids)."""
    try:
        ckpt = peek(path)
    except Exception:  # unreadable: nobody's
        return None
    return ckpt.get("run_id", "") if isinstance(ckpt, dict) else None


class TrainingFolder:
    """The lock, the run id and the checkpoints of one training run in `out`.

    resume: the checkpoint the run continues (None: a new run); overwrite: a new run deletes
    the run files (``RUN_FILES``) that `out` holds instead of refusing it.
    """

    def __init__(self, out, command, resume=None, overwrite=False):
        self.out = out
        self.lock = FolderLock(out, command)
        try:
            self.run_id = self._claim(command, resume, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _claim(self, command, resume, overwrite):
        owner = self._owner()
        if resume is None:
            if owner is not None and not overwrite:
                raise RunFolderError(f"{self.out!r} holds a run {self._progress()}; pass "
                                     f"--resume {self.out} to continue it, --overwrite to "
                                     f"delete it, or another --out")
            if owner is not None:
                self._delete_run()
            return self._write_run_file(secrets.token_hex(8), command)
        try:
            ckpt = peek(resume)
        except Exception:  # not a zip file (an old format), or damaged: the full reader says
            ckpt = read_checkpoint(resume)
        if not isinstance(ckpt, dict) or "step" not in ckpt:
            raise CheckpointError(f"{resume!r} cannot be resumed: it is not a jitfast training "
                                  f"checkpoint (no step)")
        run_id, start = ckpt.get("run_id", ""), ckpt["step"]
        if owner not in (None, run_id):
            theirs = "an older run (no run id)" if owner == "" else f"run {owner}"
            raise RunFolderError(f"{self.out!r} holds {theirs} {self._progress()}, not the run "
                                 f"of {resume!r}; resume into another --out")
        later = [step_of(p) for p in self._checkpoints() if step_of(p) > start]
        if later:
            raise RunFolderError(f"{self.out!r} holds checkpoints of this run after step "
                                 f"{start} (steps {', '.join(map(str, later))}), which a later "
                                 f"--resume would continue instead of this one; resume the "
                                 f"latest (--resume {self.out}), or move them away")
        if owner == run_id and run_id:
            return run_id
        return self._write_run_file(run_id or secrets.token_hex(8), command)

    def _checkpoints(self):
        return sorted(glob.glob(os.path.join(glob.escape(self.out), CHECKPOINT_GLOB)))

    def _owner(self):
        """The folder's run id; '' for a run from before run ids; None: nothing to lose (no
        checkpoint, no metrics)."""
        if not self._checkpoints() and not os.path.exists(self._metrics()):
            return None
        try:
            with open(os.path.join(self.out, RUN_NAME), encoding="utf-8") as f:
                return json.load(f)["run_id"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError) as err:
            raise RunFolderError(f"{os.path.join(self.out, RUN_NAME)!r} is damaged ({err}); "
                                 f"choose another --out") from None
        return ""

    def _metrics(self):
        return os.path.join(self.out, "metrics.jsonl")

    def _progress(self):
        """'at step 600 (checkpoints 400, 600; metrics to step 600)' from what is on disk."""
        steps = [step_of(p) for p in self._checkpoints()]
        metrics = self._metrics()
        logged = [r["step"] for r in read_metrics(metrics)] if os.path.exists(metrics) else []
        parts = [f"checkpoints {', '.join(map(str, steps))}" if steps else "no checkpoint",
                 f"metrics to step {logged[-1]}" if logged else "no metrics"]
        return f"at step {max(steps + logged[-1:], default=0)} ({'; '.join(parts)})"

    def _write_run_file(self, run_id, command):
        atomic_write_json(os.path.join(self.out, RUN_NAME),
                          dict(run_id=run_id, started=now(), command=command))
        return run_id

    def _delete_run(self):
        deleted = []
        for pattern in RUN_FILES:
            for path in sorted(glob.glob(os.path.join(glob.escape(self.out), pattern))):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                deleted.append(os.path.basename(path))
        print(f"--overwrite: deleted {', '.join(deleted)} from {self.out}", file=sys.stderr)

    def prune(self, keep, newest):
        """Keep the `keep` latest checkpoints of this run, `newest` (just written) among them;
        delete the others' files (every ``checkpoint-<step>.*``)."""
        own = [p for p in self._checkpoints()
               if os.path.abspath(p) != os.path.abspath(newest) and run_of(p) == self.run_id]
        for old in own[:len(own) - max(keep - 1, 0)]:
            for path in glob.glob(glob.escape(old[:-len(".pt")]) + ".*"):
                os.remove(path)

    def release(self):
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def latest_checkpoint(path):
    """`path` if it is a file, else the newest checkpoint-*.pt in the folder `path`."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, CHECKPOINT_GLOB)))
    if not os.path.isdir(path) or not found:
        raise CheckpointError(f"--resume {path!r}: no checkpoint-*.pt file there")
    return found[-1]
