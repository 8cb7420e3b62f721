"""Writes that either complete or leave the previous file alone, and fail with a message that
names the file (disk full, a file-size limit, a read-only folder)."""
import errno
import json
import os
import signal
import threading


class WriteError(OSError):
    """A file that could not be written, named, with the system's reason."""


def describe(err):
    """'File too large (EFBIG)' for an OSError with an errno, else its text."""
    if err.errno is None:
        return str(err)
    return f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"


class _Recorder:
    """A file object that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError that no longer says what happened ("unexpected pos 704 vs 598")."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def atomic_write(path, write, durable=True):
    """Call ``write(file)`` on a temporary file beside `path`, then rename it over `path`: a
    crash or a failed write leaves the previous file intact and no temporary behind (but for a
    killed process's ``<path>.tmp-<pid>``). durable: fsync before the rename (power loss)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            try:
                write(recorder)
            except Exception as err:
                raise recorder.error or err
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {describe(err)}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def append_line(fd, line, path):
    """Append one whole line to the O_APPEND descriptor `fd` with a single write."""
    data = (line + "\n").encode()
    try:
        written = os.write(fd, data)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {describe(err)}") from None
    if written != len(data):  # a file-size limit or a full disk cut the line short
        raise WriteError(f"cannot write {path}: only {written} of {len(data)} bytes of a line "
                         f"were written (disk full or a file-size limit)")


def report_size_limit_as_error():
    """Make a write past the file-size limit (``ulimit -f``) fail with EFBIG, reported like any
    other failed write, instead of SIGXFSZ killing the process without a word."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
