"""The one error of weight reading and writing (re-exported as jitfast.CheckpointError)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with what is wrong and what to do."""
