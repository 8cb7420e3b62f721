"""Training data: a deterministic batch order, an image-folder dataset with the official
preprocessing (class subfolders, or none: unconditional), MNIST-format IDX files, a memory-mapped
dataset written by ``jitfast.prepare``, and the DataLoader.

Every dataset takes items as (index, flip) pairs. ``StepBatches`` draws the order and the flips
from (seed, epoch) alone, so step s of a run always sees the same images however it was
interrupted, resumed or sharded across processes.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

from jitfast.training.fashion import load_split
from jitfast.training.idx import FASHION_NAMES, IdxError, idx_files, idx_pair, idx_prefix, read_pair
from jitfast.training.shapes import ShapesDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEMMAP_FILES = ("images.u8", "labels.npy", "meta.json")


class DataError(ValueError):
    """Training data that cannot be used, with what is wrong and what to do."""


class StepBatches:
    """Batch sampler: for steps [start, stop) the (index, flip) pairs of this rank's shard.

    Each epoch is a permutation of the dataset (the last partial batch is dropped) with one
    horizontal-flip coin per image, drawn from a generator seeded by (seed, epoch). Global batch
    b of an epoch is ``order[b*B:(b+1)*B]``; rank r of w takes the r-th of its w equal slices.
    """

    def __init__(self, num_items, global_batch, seed=0, start=0, stop=None, rank=0, world_size=1):
        if global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} must divide evenly over "
                             f"{world_size} processes")
        if num_items < global_batch:
            raise DataError(f"the dataset has {num_items} images, fewer than one global batch "
                            f"of {global_batch}: lower --batch-size or add images")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start, self.stop = start, stop
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self.steps_per_epoch = num_items // global_batch

    def epoch_order(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=gen)
        flips = torch.rand(self.num_items, generator=gen) < 0.5
        return order.tolist(), flips[order].tolist()

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        epoch, order, flips = None, None, None
        for step in range(self.start, self.stop):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order, flips = self.epoch_order(epoch)
            first = (step % self.steps_per_epoch) * self.global_batch + self.offset
            yield list(zip(order[first:first + self.local], flips[first:first + self.local]))


def center_crop_arr(image, image_size):
    """ADM's centre crop, as the official JiT uses it: halve with BOX while the short side is at
    least twice the target, resize the short side to image_size with BICUBIC, crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def load_image(path, image_size):
    """(3, size, size) uint8 array of the centre-cropped RGB image; raises OSError if unreadable."""
    with Image.open(path) as image:
        return center_crop_arr(image.convert("RGB"), image_size).transpose(2, 0, 1)


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root):
    """(paths, labels, class names) of an image folder: one subfolder per class (the ImageNet
    layout), or the images directly in it, without classes (unconditional: no class names, every
    label 0, the null class of a model with num_classes = 0). A folder with both loose images and
    subfolders holding images is refused: which of them are the data is not for us to guess."""
    if not os.path.exists(root):
        raise DataError(f"--data-path {root!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root!r} is not a folder; give a folder with one "
                        f"subfolder of images per class (the ImageNet train/ layout), or with "
                        f"the images directly in it (unconditional)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    loose = [e.path for e in entries if e.is_file() and is_image(e.name)]
    paths, labels, filled = [], [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name))):
            for file in sorted(filter(is_image, files)):
                paths.append(os.path.join(folder, file))
                labels.append(label)
        if labels and labels[-1] == label:
            filled.append(name)
    if loose and filled:
        raise DataError(f"{root!r} holds both images ({len(loose)}, e.g. "
                        f"{os.path.basename(loose[0])}) and subfolders of images ({len(filled)}, "
                        f"e.g. {filled[0]}/): put every image in a class subfolder (a "
                        f"class-conditional model), or all of them directly in one folder "
                        f"without subfolders (an unconditional model)")
    if loose:
        return loose, [0] * len(loose), []
    if not paths:
        raise DataError(f"no images found under {root!r}: expected one subfolder per class, or "
                        f"the images directly in it (unconditional), holding "
                        f"{', '.join(IMAGE_EXTENSIONS)} files (found {len(classes)} subfolders)")
    return paths, labels, classes


def check_sizes(paths, image_size, probes=32):
    """Refuse a folder whose images are mostly smaller than the crop (a wrong --image-size or
    thumbnails); single small images are upscaled by BICUBIC, as the official pipeline does."""
    picks = paths[::max(1, len(paths) // probes)][:probes]
    sizes = []
    for path in picks:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except OSError:
            continue
    small = [s for s in sizes if min(s) < image_size]
    if sizes and len(small) * 2 > len(sizes):
        raise DataError(f"{len(small)} of {len(sizes)} probed images are smaller than the "
                        f"{image_size} px crop (e.g. {small[0][0]}x{small[0][1]}): lower "
                        f"--image-size or use larger images")


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet-layout folder, decoded in DataLoader workers. Item (index, flip) gives
    (uint8 (3, S, S), label, unreadable paths): an unreadable file is replaced by the next
    readable one, so batches keep their size, and reported so the trainer can count it."""

    def __init__(self, root, image_size):
        self.paths, self.labels, self.class_names = scan_folder(root)
        self.num_classes, self.image_size = len(self.class_names), image_size
        check_sizes(self.paths, image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, flip = item
        bad = []
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                image = load_image(path, self.image_size)
                break
            except OSError:
                bad.append(path)
        else:
            raise DataError("no image in the folder could be decoded")
        if flip:
            image = image[:, :, ::-1]
        label = self.labels[(index + len(bad)) % len(self.paths)]
        return torch.from_numpy(image.copy()), label, bad


def collate_folder(items):
    images, labels, bad = zip(*items)
    return torch.stack(images), torch.tensor(labels), [p for paths in bad for p in paths]


class MemmapImages(torch.utils.data.Dataset):
    """The uint8 array written by ``jitfast.prepare``, read in place; flips applied at load."""

    def __init__(self, root):
        missing = [f for f in MEMMAP_FILES if not os.path.exists(os.path.join(root, f))]
        if missing:
            raise DataError(f"{root!r} is not a prepared dataset (missing {', '.join(missing)}); "
                            f"create it with python -m jitfast.prepare SRC {root} --image-size N")
        with open(os.path.join(root, "meta.json")) as f:
            meta = json.load(f)
        self.class_names = meta["classes"]
        self.num_classes, self.image_size = len(self.class_names), meta["image_size"]
        self.labels = np.load(os.path.join(root, "labels.npy"))
        shape = (len(self.labels), 3, self.image_size, self.image_size)
        self.images = np.memmap(os.path.join(root, "images.u8"), np.uint8, "r", shape=shape)

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, items):
        index, flip = map(np.asarray, zip(*items))
        images = self.images[index]
        images[flip] = images[flip, :, :, ::-1]
        return torch.from_numpy(images), torch.from_numpy(self.labels[index]), []


class IdxImages(torch.utils.data.Dataset):
    """Grayscale images (N, H, W) uint8 held in memory as they are stored (60000 MNIST images:
    47 MB), made at load what an image folder makes of a grayscale file: ``center_crop_arr`` to
    the crop size (28 px to 32: the BICUBIC upscale of the official pipeline), repeated into
    RGB, flipped when asked. `origin` says where they came from."""

    def __init__(self, images, labels, image_size, class_names, origin=""):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.origin = origin

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, items):
        index, flip = map(np.asarray, zip(*items))
        gray = self.images[index]
        if gray.shape[1:] != (self.image_size, self.image_size):
            gray = np.stack([center_crop_arr(Image.fromarray(g), self.image_size) for g in gray])
        gray[flip] = gray[flip, :, ::-1]
        images = np.repeat(gray[:, None], 3, axis=1)
        return torch.from_numpy(images), torch.from_numpy(self.labels[index].astype(np.int64)), []


def passthrough(batch):
    """The collate of datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


def open_idx(data_path, image_size):
    """The IdxImages of the IDX pair `data_path` names (a folder: its training split; or an
    images file: ``jitfast.training.idx.idx_pair``), or None when it names none."""
    try:
        pair = idx_pair(data_path)
        if pair is None:
            return None
        images, labels, names = read_pair(*pair)
    except IdxError as err:
        raise DataError(str(err)) from None
    folder, (images_file, labels_file) = os.path.dirname(pair[0]), map(os.path.basename, pair)
    rows, cols = images.shape[1:]
    origin = (f"{images_file} and {labels_file} in {os.path.abspath(folder)} ({rows}x{cols} "
              f"grayscale, to {image_size} px RGB)")
    others = sorted(set(idx_files(folder)) - {idx_prefix(images_file)})
    if others:
        origin += (f"; other sets there: {', '.join(others)} (give an images file as the path "
                   f"to use one)")
    return IdxImages(images, labels, image_size, names, origin)


BUILTIN_DATASETS = ("fashion-mnist", "shapes")


def builtin_dataset(name, image_size, seed=0):
    """A dataset that comes with jitfast: the Fashion-MNIST subset (``jitfast.training.fashion``)
    or the procedural shapes (``jitfast.training.shapes``)."""
    if name == "shapes":
        return ShapesDataset(image_size, seed=seed)
    if name != "fashion-mnist":
        raise DataError(f"the built-in datasets are {BUILTIN_DATASETS}, not {name!r}")
    try:
        images, labels = load_split("train")
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    return IdxImages(images, labels, image_size, FASHION_NAMES,
                     f"the built-in Fashion-MNIST subset ({len(labels)} images of its training "
                     f"split, 28x28 grayscale, to {image_size} px RGB)")


def open_dataset(data_path, image_size, seed=0, builtin="fashion-mnist"):
    """The dataset to train on: a built-in one (no path), a prepared memmap folder, IDX files
    (MNIST and kin) or an image folder."""
    if data_path is None:
        return builtin_dataset(builtin, image_size, seed)
    if os.path.exists(os.path.join(data_path, "meta.json")):
        dataset = MemmapImages(data_path)
        if dataset.image_size != image_size:
            raise DataError(f"{data_path!r} was prepared at {dataset.image_size} px, not "
                            f"--image-size {image_size}")
        return dataset
    return open_idx(data_path, image_size) or ImageFolder(data_path, image_size)


def default_workers():
    """DataLoader workers when --num-workers is not given: one per core, 8 at most."""
    return min(8, len(os.sched_getaffinity(0)))


def make_loader(dataset, sampler, num_workers=None, pin_memory=False):
    """Batches (uint8 images, labels, unreadable paths), loaded in `num_workers` processes
    (default: ``default_workers()``; 0: in this one)."""
    num_workers = default_workers() if num_workers is None else num_workers
    collate = passthrough if hasattr(dataset, "__getitems__") else collate_folder
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, prefetch_factor=4 if num_workers else None)


def to_model_input(images, out=None):
    """Float images in [-1, 1] from a uint8 batch (on the device it will be used on), written
    into `out` when given: a float32 buffer of the batch's shape reused from step to step (on
    the CPU a fresh 100-MB tensor costs about 30 ms of page faults each time). The cast is a
    copy, then in-place float ops: a division straight from uint8 takes 5x longer on the CPU."""
    if out is None:
        out = torch.empty(images.shape, device=images.device)
    return out.copy_(images).div_(127.5).sub_(1.0)


def check_unreadable(bad, seen, max_fraction, min_seen):
    """Stop once enough images were read to judge and too many of them were unreadable."""
    if bad > max_fraction * seen and seen >= min_seen:
        raise DataError(f"{bad} of the {seen} images read so far could not be decoded (more "
                        f"than --max-bad-fraction {max_fraction}); fix or remove them "
                        f"(python -m jitfast.prepare lists them)")
