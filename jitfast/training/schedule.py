"""The learning rate of each step: a linear warm-up, then constant or a half-cosine down to
min_lr at the last step."""
import math


def lr_at(step, base_lr, steps, warmup_steps, schedule="constant", min_lr=0.0):
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    done = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * done))
