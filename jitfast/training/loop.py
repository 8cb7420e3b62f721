"""The short in-process training loop of the experiments: the trainer's step (train_step),
AdamW (make_optimizer), warm-up and EMA, on batches of a dataset with a ``batch(indices)``
method, one process, no run folder."""
import math

from jitfast.training.ema import EMA
from jitfast.training.schedule import lr_at
from jitfast.training.step import make_optimizer, set_lr, train_step


def fit(denoiser, data, steps, batch, lr, ema_decay):
    """Train `denoiser` in place for `steps` steps of `batch` images (images i·batch ... of
    `data`), the lr warming up over the first min(50, steps / 4) steps; returns its EMA (started
    from its current weights) and the loss of every step. A non-finite loss stops it."""
    ema = EMA(denoiser, (ema_decay,))
    device = next(denoiser.parameters()).device
    optimizer = make_optimizer(denoiser.parameters(), lr, device)
    warmup = min(50, steps // 4)
    losses = []
    for step in range(steps):
        x, y = data.batch(range(step * batch, (step + 1) * batch))
        set_lr(optimizer, lr_at(step, lr, steps, warmup))
        loss = train_step(denoiser, denoiser, optimizer, ema, x.to(device), y.to(device), None,
                          None).item()
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        losses.append(loss)
    return ema, losses
