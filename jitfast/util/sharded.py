"""Tensors that FSDP2 may have sharded across processes (DTensors), seen from one process."""
from torch.distributed.tensor import DTensor


def is_sharded(tensor):
    return isinstance(tensor, DTensor)


def local(tensor):
    """The part of `tensor` this process holds: a sharded parameter's (or gradient's, or
    optimizer state's, sharded alike) local rows, else the tensor itself. In-place updates of it
    update the whole."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(value, device=None):
    """The whole of a sharded tensor (a collective: every process takes part), on `device` if
    given; anything else as it is."""
    if not is_sharded(value):
        return value
    whole = value.full_tensor()
    return whole if device is None else whole.to(device)
