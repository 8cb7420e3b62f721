"""Autocast's state, as the fused ops and the network's held weight copies ask for it."""
import torch


def autocast_dtype(device_type):
    """Autocast's dtype where it is enabled for this device type, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
