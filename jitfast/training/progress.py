"""What a run reports: progress on stderr (tqdm's bar on a terminal, plain lines in a log) and
a metrics log (JSONL that survives crashes, plus TensorBoard when it is installed)."""
import json
import os
import sys
import time

from tqdm import tqdm

from jitfast.util.files import WriteError, append_line, describe

PLAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Progress:
    """A loop's progress: tqdm's bar on a terminal; where the stream is a file or a pipe, one
    plain line per update (no carriage returns to garble the log)."""

    def __init__(self, total, first=0, unit="step", stream=None):
        self.stream = stream or sys.stderr
        self.total, self.first, self.unit = total, first, unit
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, initial=first, unit=unit, file=self.stream,
                        dynamic_ncols=True) if self.stream.isatty() else None

    def update(self, n, **fields):
        postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, float) else v}"
                            for k, v in fields.items())
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n - self.bar.n)
            return
        line = tqdm.format_meter(n, self.total, time.perf_counter() - self.start,
                                 prefix=self.unit, unit=self.unit, initial=self.first,
                                 postfix=postfix, bar_format=PLAIN_FORMAT)
        print(line, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """One JSON object per logged step, appended to `path` a whole line per write; scalars are
    mirrored to TensorBoard.

    The file is never truncated. A crash leaves at most a torn last line (which ``read_metrics``
    skips, and the next writer ends with a newline); a resumed run first appends
    ``{"resumed_from": step}``, after which readers drop the records of later steps.
    """

    def __init__(self, path, resumed_from=None, tensorboard=True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self.fd).st_size
            torn = size > 0 and os.pread(self.fd, 1, size - 1) != b"\n"
        except OSError as err:
            raise WriteError(f"cannot write {path}: {describe(err)}") from None
        if torn:
            append_line(self.fd, "", path)  # the torn line stays one (skipped) line
        if resumed_from is not None:
            append_line(self.fd, json.dumps({"resumed_from": resumed_from}), path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
            except ImportError:
                pass

    def write(self, step, **metrics):
        append_line(self.fd, json.dumps({"step": step, **metrics}), self.path)
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def close(self):
        os.close(self.fd)
        if self.writer is not None:
            self.writer.close()


def read_metrics(path):
    """The records of a metrics log, in step order: torn lines (a crash mid-write) are skipped,
    and a resume marker drops the records logged after its step by the run it replaced."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if "resumed_from" in record:
                records = [r for r in records if r["step"] <= record["resumed_from"]]
            elif "step" in record:
                records.append(record)
    return records
