"""jitfast: fast, faithful training and sampling of JiT pixel-space diffusion transformers."""
from jitfast.model import JiT
from jitfast.presets import JiT_models

__all__ = ["JiT", "JiT_models"]
