"""jitfast: fast, faithful training and sampling of JiT pixel-space diffusion transformers."""
import os
import warnings
from functools import partial

# jitfast.kernels is the top-level kernels/ folder: setup.py maps it when installing, and from a
# source checkout (on PYTHONPATH, or the working directory) the checkout's root joins the search
# path of this package's submodules, so that `import jitfast.kernels` needs no install.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) \
        and os.path.isfile(os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)

from jitfast.diffusion.denoiser import Denoiser
from jitfast.export import export
from jitfast.io import pretrained
from jitfast.io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from jitfast.diffusion.pmf_objective import PMFDraws, PMFObjective
from jitfast.diffusion.pmf_sampler import PMFSampler
from jitfast.network.model import JiT
from jitfast.network.pmf import PMF
from jitfast.network.pmf_presets import PMF_models
from jitfast.network.presets import JiT_models
from jitfast.network.transfer import TransferError, transfer
from jitfast.training.ema import EMA

# The network knows nothing of files or the Hub (jitfast.io is a layer above it, docs/design.md);
# JiT.from_pretrained and net.save_pretrained are the io layer's functions, attached here.
JiT.from_pretrained = staticmethod(partial(pretrained.from_pretrained, family="JiT"))
JiT.save_pretrained = pretrained.save_pretrained
PMF.from_pretrained = staticmethod(partial(pretrained.from_pretrained, family="pMF"))
PMF.save_pretrained = pretrained.save_pretrained

# `python -m jitfast.export` runs as __main__ the module imported above for `jitfast.export(...)`;
# runpy warns about that, harmlessly
warnings.filterwarnings("ignore", r"'jitfast\.export' found in sys\.modules", RuntimeWarning)

__all__ = ["JiT", "JiT_models", "PMF", "PMF_models", "PMFSampler", "PMFObjective", "PMFDraws",
           "Denoiser", "EMA", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "CheckpointError", "export", "transfer", "TransferError"]
