"""jitfast: fast, faithful training and sampling of JiT pixel-space diffusion transformers."""
from jitfast.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from jitfast.diffusion import Denoiser
from jitfast.ema import EMA
from jitfast.model import JiT
from jitfast.presets import JiT_models

__all__ = ["JiT", "JiT_models", "Denoiser", "EMA", "load_checkpoint", "read_checkpoint",
           "save_checkpoint", "CheckpointError"]
