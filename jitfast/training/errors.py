"""The error of a training run that cannot go on."""


class TrainingError(RuntimeError):
    """A run that cannot go on: a non-finite loss, a missing optimizer, a finished checkpoint."""
