"""What a training run reports: an in-place progress line on stderr and a metrics log (JSONL,
plus TensorBoard when it is installed)."""
import json
import os
import sys
import time


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """One stderr line rewritten in place: step, loss, images/s and ETA."""

    def __init__(self, total, first=0, stream=sys.stderr, width=24):
        self.total, self.first, self.stream, self.width = total, first, stream, width
        self.start = time.perf_counter()

    def update(self, step, **fields):
        done = (step - self.first) / max(1, self.total - self.first)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (1 - done) if done > 0 else 0.0
        filled = int(self.width * step / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        values = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in fields.items())
        self.stream.write(f"\r[{bar}] {step}/{self.total} {values} "
                          f"eta {format_seconds(eta)}\x1b[K")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


class MetricsLog:
    """One JSON object per logged step in `path` (appended to when resuming); scalars are
    mirrored to TensorBoard."""

    def __init__(self, path, append=False, tensorboard=True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.file = open(path, "a" if append else "w", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
            except ImportError:
                pass

    def write(self, step, **metrics):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path):
    """The records of a metrics log, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
