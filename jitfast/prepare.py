"""Convert an image folder or MNIST-format IDX files once into a memory-mapped uint8 array that
training reads directly: ``python -m jitfast.prepare SRC DST --image-size N``.

DST gets images.u8 (N, 3, S, S) centre-cropped as the official pipeline does (flips are applied at
load time, so one copy serves every epoch), labels.npy and meta.json (class names, size, count).
Unreadable images are skipped and listed; more than --max-bad-fraction of them is an error.
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool

import numpy as np

from jitfast.training.data import DataError, check_sizes, load_image, open_idx, scan_folder


def decode(job):
    path, image_size = job
    try:
        return load_image(path, image_size)
    except OSError:
        return None


def prepare(src, dst, image_size, workers=None, max_bad_fraction=0.01, stream=None):
    """Write the memmap dataset; returns (images written, unreadable paths). meta.json is
    written last, so a folder without it is an interrupted conversion, never a silent one.
    Progress goes to `stream` (default: sys.stderr)."""
    stream = stream or sys.stderr
    idx = open_idx(src, image_size)
    if idx is not None:
        return prepare_idx(idx, dst, stream), []
    paths, labels, classes = scan_folder(src)
    check_sizes(paths, image_size)
    images, tmp = new_images(dst, len(paths), image_size)
    kept, bad = [], []
    with Pool(workers or os.cpu_count()) as pool:
        jobs = [(path, image_size) for path in paths]
        for i, image in enumerate(pool.imap(decode, jobs, chunksize=16)):
            if image is None:
                bad.append(paths[i])
                continue
            images[len(kept)] = image
            kept.append(labels[i])
            if (i + 1) % 1000 == 0:
                stream.write(f"\r{i + 1}/{len(paths)} images")
    images.flush()
    del images
    if len(bad) > max_bad_fraction * len(paths):
        os.remove(tmp)
        raise DataError(f"{len(bad)} of {len(paths)} images could not be decoded (more than "
                        f"--max-bad-fraction {max_bad_fraction}), e.g. {', '.join(bad[:5])}")
    os.truncate(tmp, len(kept) * 3 * image_size**2)  # unreadable images left rows unused
    finish(dst, tmp, kept, dict(classes=classes, image_size=image_size,
                                source=os.path.abspath(src), unreadable=bad))
    return len(kept), bad


def prepare_idx(dataset, dst, stream, chunk=1024):
    """Write the IdxImages `dataset` (MNIST and kin) resized; returns the number of images."""
    stream.write(f"{dataset.origin}\n")
    images, tmp = new_images(dst, len(dataset), dataset.image_size)
    for first in range(0, len(dataset), chunk):
        items = [(i, False) for i in range(first, min(first + chunk, len(dataset)))]
        images[first:first + len(items)] = dataset.__getitems__(items)[0].numpy()
        stream.write(f"\r{first + len(items)}/{len(dataset)} images")
    images.flush()
    del images
    finish(dst, tmp, dataset.labels, dict(classes=dataset.class_names,
                                          image_size=dataset.image_size, source=dataset.origin))
    return len(dataset)


def new_images(dst, count, image_size):
    """(uint8 memmap (count, 3, S, S), its path): a temporary file that ``finish`` renames."""
    os.makedirs(dst, exist_ok=True)
    tmp = os.path.join(dst, "images.u8.tmp")
    return np.memmap(tmp, np.uint8, "w+", shape=(count, 3, image_size, image_size)), tmp


def finish(dst, tmp, labels, meta):
    """Rename the images into place, then write labels.npy and, last, meta.json (with the
    count)."""
    os.replace(tmp, os.path.join(dst, "images.u8"))
    np.save(os.path.join(dst, "labels.npy"), np.asarray(labels, dtype=np.int64))
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump({**meta, "count": len(labels)}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jitfast.prepare", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="image folder: one subfolder of images per class (ImageNet "
                   "layout), or the images directly in it (unconditional); or MNIST-format IDX "
                   "files: a folder (its train- pair) or one *-images-idx3-ubyte[.gz] file")
    p.add_argument("dst", help="output folder")
    p.add_argument("--image-size", type=int, required=True, help="crop size (px)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes; default: all cores")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the images is unreadable")
    args = p.parse_args(argv)
    try:
        count, bad = prepare(args.src, args.dst, args.image_size, args.workers,
                             args.max_bad_fraction)
    except DataError as err:
        sys.exit(f"error: {err}")
    for path in bad:
        print(f"unreadable, skipped: {path}", file=sys.stderr)
    print(f"\nwrote {count} images of {args.image_size} px to {args.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
