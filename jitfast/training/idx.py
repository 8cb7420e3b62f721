"""IDX files, the format MNIST, Fashion-MNIST, KMNIST and EMNIST ship in: an images file
``<prefix>-images-idx3-ubyte`` beside its labels file ``<prefix>-labels-idx1-ubyte`` (``.`` for
the last ``-`` and a ``.gz`` suffix are accepted too; gzip is recognised by its content).

The format, big-endian: magic 0x00000803 (unsigned bytes, 3 dimensions), N, rows, cols as uint32,
then N·rows·cols pixels, row-major; labels: magic 0x00000801, N, then N bytes.
"""
import gzip
import hashlib
import os
import re
import zlib

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
IDX_NAME = re.compile(r"^(?P<prefix>.+)-(?P<kind>images|labels)[-.]idx[13]-ubyte(\.gz)?$")
TRAIN_PREFIX = re.compile(r"(^|[-_.])train$")
GZIP_MAGIC = b"\x1f\x8b"
# Fashion-MNIST's classes, recognised by the SHA-256 of its whole train or t10k label sequence
# (MNIST and KMNIST have the same counts, so nothing less than the labels themselves tells)
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")
FASHION_LABELS_SHA256 = (
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",  # train, 60000
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9")  # t10k, 10000


class IdxError(ValueError):
    """IDX files that cannot be used, with what is wrong and what to do."""


def idx_files(folder):
    """{prefix: {"images": path, "labels": path}} of the IDX files in `folder` (one of each kind
    per prefix, possibly missing; an uncompressed file wins over its .gz)."""
    found = {}
    for name in sorted(os.listdir(folder), key=lambda n: (n.endswith(".gz"), n)):
        match = IDX_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            found.setdefault(match["prefix"], {}).setdefault(match["kind"],
                                                             os.path.join(folder, name))
    return found


def idx_prefix(name):
    """The set an IDX file name belongs to (``train`` of train-images-idx3-ubyte.gz), or None."""
    match = IDX_NAME.match(name)
    return match["prefix"] if match else None


def idx_pair(path):
    """(images file, labels file) that `path` names, or None when it is no IDX data: `path` is
    an images file, or a folder whose training pair (prefix ``train`` or ``...-train``) is used,
    or its only pair. Raises IdxError for a missing half or a choice it cannot make."""
    if os.path.isfile(path):
        match = IDX_NAME.match(os.path.basename(path))
        if match is None:
            return None
        if match["kind"] == "labels":
            raise IdxError(f"{path!r} is an IDX labels file: give its images file (or the folder "
                           f"holding both)")
        folder, prefix = os.path.dirname(path) or ".", match["prefix"]
        return complete_pair(prefix, idx_files(folder).get(prefix, {}), folder)
    if not os.path.isdir(path):
        return None
    pairs = idx_files(path)
    if not pairs:
        return None
    train = [p for p in pairs if TRAIN_PREFIX.search(p)]
    chosen = train if train else list(pairs)
    if len(chosen) != 1:
        example = min(f for files in pairs.values() for f in files.values())
        why = f"{len(train)} are training splits" if train else \
            "none is named as the training split (train-...)"
        raise IdxError(f"{path!r} holds the IDX files of {len(pairs)} sets "
                       f"({', '.join(sorted(pairs))}) and {why}: give the images file of the "
                       f"one to use instead of the folder (e.g. {example})")
    return complete_pair(chosen[0], pairs[chosen[0]], path)


def complete_pair(prefix, files, folder):
    for kind, other in (("images", "labels"), ("labels", "images")):
        if kind not in files:
            idx = "idx3" if kind == "images" else "idx1"
            raise IdxError(f"{files[other]!r} has no {kind} file beside it (expected "
                           f"{os.path.join(folder, f'{prefix}-{kind}-{idx}-ubyte')}[.gz]): "
                           f"IDX images and labels come in pairs; copy the missing file there")
    return files["images"], files["labels"]


def read_bytes(path):
    """The file's bytes, gunzipped when it is gzip data (whatever its name)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise IdxError(f"{path!r} is a corrupt or truncated gzip file ({err}): download it "
                       f"again (gzip -t checks a file)") from None


def read_idx(path, magic):
    """The uint8 array of an IDX file whose magic number must be `magic` (its low byte is the
    number of dimensions); a view of the bytes read, no copy."""
    kind, other = ("images", "labels") if magic == IMAGES_MAGIC else ("labels", "images")
    data = read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found != magic:
        swapped = found == IMAGES_MAGIC + LABELS_MAGIC - magic
        hint = (f"it is an IDX {other} file: are the file names swapped?" if swapped else
                "is it an IDX file at all?")
        raise IdxError(f"{path!r} is not an IDX {kind} file: its magic number is 0x{found:08x}, "
                       f"not 0x{magic:08x} ({hint})")
    if len(data) < header:
        raise IdxError(f"{path!r} is truncated: {len(data)} bytes, less than the {header}-byte "
                       f"IDX header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    size = int(np.prod(dims))
    if len(data) != header + size:
        what = "is truncated" if len(data) < header + size else "is longer than its header says"
        raise IdxError(f"{path!r} {what}: its header announces {' x '.join(map(str, dims))} "
                       f"{kind} ({header + size} bytes), the file holds {len(data)} bytes; "
                       f"download it again")
    return np.frombuffer(data, np.uint8, size, header).reshape(dims)


def read_pair(images_path, labels_path):
    """(images uint8 (N, rows, cols), labels uint8 (N,), class names) of an IDX pair. EMNIST's
    images (files named emnist-...) are stored transposed and are turned upright, as
    torchvision does."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise IdxError(f"{images_path!r} holds {len(images)} images but {labels_path!r} "
                       f"{len(labels)} labels: the files are not a pair (or one is cut short); "
                       f"take both from the same download")
    if images.size == 0:
        raise IdxError(f"{images_path!r} holds no images ({' x '.join(map(str, images.shape))})")
    if os.path.basename(images_path).startswith("emnist-"):
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images, labels, class_names(labels)


def class_names(labels):
    """Fashion-MNIST's names for its own label files, else the label values "0", "1", ..."""
    if hashlib.sha256(labels.tobytes()).hexdigest() in FASHION_LABELS_SHA256:
        return list(FASHION_NAMES)
    return [str(k) for k in range(int(labels.max()) + 1)]
