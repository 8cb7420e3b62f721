"""Model folders (config.json + safetensors): ``JiT.save_pretrained`` / ``JiT.from_pretrained``,
from a local folder or a Hugging Face Hub repo (through huggingface_hub, an optional extra).

From the Hub only ``*.json`` and ``*.safetensors`` are downloaded: a repo's remote code is never
fetched, imported or run.
"""
import json
import os
import re

from jitfast.io.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from jitfast.io.families import family_named
from jitfast.io.weight_files import CONFIG_NAME, WEIGHTS_NAME, save_safetensors
from jitfast.util.files import atomic_write

FOLDER_LAYOUTS = ("jitfast", "diffusers")
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def save_pretrained(net, folder, layout="jitfast", weights=None):
    """Write `net` as a model folder. layout "jitfast": jitfast's (= the official) keys and the
    JiT keywords; "diffusers": the keys and config.json of diffusers pull request #13098's
    JiTTransformer2DModel. `weights` ("ema1", ...) names the set in the file's metadata."""
    family = family_named(net.family)
    if layout not in FOLDER_LAYOUTS or layout not in family.layouts:
        offered = [name for name in FOLDER_LAYOUTS if name in family.layouts]
        raise ValueError(f"a {family.name} network's folder layouts are {offered}, not "
                         f"{layout!r}")
    config, state = family.folder(net, layout)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, WEIGHTS_NAME),
                     **({"weights": weights} if weights else {}))
    text = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write(os.path.join(folder, CONFIG_NAME), lambda f: f.write(text))
    return folder


def hub_folder(repo_id, subfolder=None):
    """The local copy of a Hub repo's config and safetensors (downloaded or cached)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local path, and reading it as a Hugging "
                              f"Face Hub repo needs huggingface_hub: pip install 'jitfast[hub]', "
                              f"or pass a local folder") from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = snapshot_download(repo_id, allow_patterns=[prefix + "*.json",
                                                          prefix + "*.safetensors"])
    except Exception as err:  # offline, no network, no such repo: all told the same way
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in \
            (None, "", "0") else ""
        include = f" --include '{prefix}*'" if prefix else ""
        first_line = (str(err).splitlines() or [""])[0].rstrip(".")
        raise CheckpointError(
            f"{repo_id!r} is not a local path, and cannot be had from the Hugging Face "
            f"Hub{offline}: {type(err).__name__}: {first_line}. Download it where there is "
            f"network (huggingface-cli download {repo_id}{include} --local-dir DIR) and pass "
            f"the local folder") from None
    return os.path.join(root, subfolder) if subfolder else root


def from_pretrained(source, subfolder=None, weights=None, device="cpu", backend="auto",
                    family=None, **overrides):
    """A ready network (eval mode) from a model or pipeline folder, a weights file, or a Hub repo
    id (e.g. "BiliSakura/JiT-diffusers", subfolder="JiT-B-16"); `family` ("JiT" | "pMF")
    refuses the other family's weights (``JiT.from_pretrained`` and ``PMF.from_pretrained`` set
    it); keyword overrides as in ``load_checkpoint``."""
    path = os.fspath(source)
    if not os.path.exists(path) and REPO_ID.fullmatch(path):
        path = hub_folder(path, subfolder)
    elif subfolder:
        path = os.path.join(path, subfolder)
    return model_from_checkpoint(read_checkpoint(path), weights, device, backend, family,
                                 **overrides)
