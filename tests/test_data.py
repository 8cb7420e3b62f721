"""Datasets and loaders: the built-in shapes, the batch order, image folders (class subfolders
or unconditional), IDX files (MNIST and kin) and memmaps."""
import gzip
import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from jitfast.io.images import to_uint8
from jitfast.prepare import prepare
from jitfast.training import idx
from jitfast.training.data import (DataError, IdxImages, ImageFolder, MemmapImages, StepBatches,
                                   center_crop_arr, load_image, make_loader, open_dataset,
                                   to_model_input)
from jitfast.training.shapes import (CLASSES, EXTENT, NUM_CLASSES, NUM_PARAMS, SHAPES,
                                     ShapesDataset, render)


def write_folder(root, sizes_per_class, seed=0):
    """An ImageNet-layout folder: class k holds len(sizes_per_class[k]) random JPEG/PNG images."""
    rng = np.random.default_rng(seed)
    for k, sizes in enumerate(sizes_per_class):
        os.makedirs(root / f"n{k:03d}", exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"n{k:03d}" / f"img{i}.png")
    return root


def test_shapes_are_deterministic_per_seed_and_index():
    a = ShapesDataset(32, seed=3).batch([5, 17, 2])
    b = ShapesDataset(32, seed=3).batch([2, 5])  # another batch composition and order
    assert torch.equal(a[0][0], b[0][1]) and torch.equal(a[0][2], b[0][0])
    assert torch.equal(a[1], torch.tensor([5, 7, 2]))
    c = ShapesDataset(32, seed=4).batch([5])
    assert not torch.equal(a[0][0], c[0][0])
    x = a[0]
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2


def test_shapes_items_are_the_float_images_quantised_like_to_uint8():
    """Training items are uint8, rounded as jitfast.io.images.to_uint8 rounds (a pixel may differ
    by one where 255·(x+1)/2 falls on a .5 tie in one formula and not the other)."""
    dataset = ShapesDataset(37, seed=1)
    images, labels, bad = dataset.__getitems__([(i, False) for i in (9, 0, 4)])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 37, 37) and bad == []
    assert labels.tolist() == [9, 0, 4]
    expected = torch.from_numpy(to_uint8(dataset.batch([9, 0, 4])[0])).permute(0, 3, 1, 2)
    differ = images.int() - expected.int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-3
    image, label = dataset[(4, True)]
    assert torch.equal(image, images[2]) and label == 4


def reference_render(labels, params, size):
    """The shapes images computed on the whole pixel grid, formula by formula."""
    p = params.T[:, :, None, None]
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    angle, freq, phase = p[0] * torch.pi, 2 + 6 * p[1], 2 * torch.pi * p[2]
    along = gx * torch.cos(angle) + gy * torch.sin(angle)
    across = -gx * torch.sin(angle) + gy * torch.cos(angle)
    stripes = torch.sin(freq * torch.pi * along + phase)
    checks = stripes * torch.sin(freq * torch.pi * across + phase)
    pattern = (torch.where(p[5] < 0.5, stripes, checks) > 0).unsqueeze(1)
    base = 0.25 + 0.4 * params[:, 6:9, None, None]
    background = torch.where(pattern, base, base * (0.6 + 0.3 * p[3].unsqueeze(1)))
    radius = 0.3 + 0.3 * p[9]
    cx, cy = (1 - radius) * (2 * p[10] - 1), (1 - radius) * (2 * p[11] - 1)
    rot, tilt = 2 * torch.pi * p[12], 2 * torch.pi * p[13]
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    u = dx * torch.cos(rot) + dy * torch.sin(rot)
    v = -dx * torch.sin(rot) + dy * torch.cos(rot)
    inside = torch.stack([SHAPES[k](u[i], v[i]) for i, k in enumerate(labels.tolist())])
    shade = 0.85 + 0.15 * (u * torch.cos(tilt) - v * torch.sin(tilt))
    colour = torch.tensor([c for _, c in CLASSES])[labels][:, :, None, None]
    foreground = (colour * (0.9 + 0.1 * p[14].unsqueeze(1)) * shade.unsqueeze(1)).clamp(0, 1)
    return torch.where(inside.unsqueeze(1), foreground, background) * 2 - 1


def test_render_equals_the_formulas_on_the_whole_grid():
    """The renderer's shortcuts (outer sums of rows and columns, the foreground drawn only in
    its shape's box) change nothing but rounding: a background wave's sign may flip where it is
    within rounding of zero."""
    params = torch.rand(30, NUM_PARAMS, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % NUM_CLASSES
    for size in (23, 64):
        differ = (render(labels, params, size) - reference_render(labels, params, size)).abs()
        assert (differ > 1e-5).float().mean() < 1e-4, size


def test_shapes_classes_are_distinct():
    """Every pair of classes differs in outline (IoU of the unit shapes) and in colour, and the
    rendered images carry it: same parameters, another label, another image. Every shape lies
    within EXTENT of its centre (the renderer draws nothing beyond it)."""
    axis = torch.linspace(-1.2, 1.2, 64)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    masks = torch.stack([f(u, v) for f in SHAPES]).flatten(1)
    assert not masks[:, (torch.hypot(u, v) > EXTENT).flatten()].any()
    colours = torch.tensor([c for _, c in CLASSES])
    for a in range(NUM_CLASSES):
        for b in range(a + 1, NUM_CLASSES):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85 and (colours[a] - colours[b]).norm() > 0.3, (a, b)
    params = torch.rand(1, NUM_PARAMS).expand(NUM_CLASSES, -1)
    x = render(torch.arange(NUM_CLASSES), params, 32)
    changed = (x[:, None] != x[None]).any(2).float().mean((2, 3))  # pixel fraction per pair
    assert (changed + torch.eye(NUM_CLASSES) > 0.01).all()


def test_loader_workers_give_the_batches_of_one_process():
    """Shapes rendered in two DataLoader workers arrive in step order, equal to rendering them
    here, batch for batch."""
    dataset = ShapesDataset(19, length=40, seed=2)
    sampler = StepBatches(40, 6, seed=1, start=0, stop=5)
    here, workers = make_loader(dataset, sampler, 0), make_loader(dataset, sampler, 2)
    for items, a, b in zip(sampler, here, workers, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0], dataset.batch([i for i, _ in items], torch.uint8)[0])


def test_step_batches_cover_epochs_and_shard_like_one_process():
    one = list(StepBatches(10, 4, seed=1, start=0, stop=5))
    assert all(len(b) == 4 for b in one)
    epoch0 = [i for b in one[:2] for i, _ in b]
    assert len(set(epoch0)) == 8  # no repeats within an epoch (2 steps of 4 from 10 images)
    assert [i for b in one[2:4] for i, _ in b] != epoch0  # a new order each epoch
    resumed = list(StepBatches(10, 4, seed=1, start=3, stop=5))
    assert resumed == one[3:]
    ranks = [list(StepBatches(10, 4, seed=1, start=0, stop=5, rank=r, world_size=2))
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatches(3, 4)


def test_center_crop_matches_adm_rule():
    image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3))
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3)
    # Manual: 200 >= 128 -> BOX to 150x100; BICUBIC short side to 64 -> 96x64; centre 64 cols.
    ref = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(ref)[:, 16:80])


def test_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"), 32)
    (tmp_path / "empty" / "n000").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        open_dataset(str(tmp_path / "empty"), 32)
    small = write_folder(tmp_path / "small", [[(16, 16)] * 3, [(20, 16)] * 3])
    with pytest.raises(DataError, match=r"smaller than the 32 px crop \(e.g. 16x16\)"):
        open_dataset(str(small), 32)


def test_folder_replaces_and_reports_unreadable_images(tmp_path):
    root = write_folder(tmp_path / "data", [[(40, 48)] * 3, [(48, 40)] * 3])
    (root / "n000" / "img1.png").write_bytes(b"not a png")
    ds = ImageFolder(str(root), 32)
    assert ds.num_classes == 2 and len(ds) == 6
    image, label, bad = ds[(1, False)]
    assert bad == [str(root / "n000" / "img1.png")]
    good, good_label, _ = ds[(2, False)]  # the replacement is the next readable image
    assert torch.equal(image, good) and label == good_label == 0
    flipped, _, _ = ds[(2, True)]
    assert torch.equal(flipped, good.flip(-1))


def test_prepare_then_memmap_matches_the_folder_loader(tmp_path):
    root = write_folder(tmp_path / "data", [[(40, 48), (64, 40)], [(48, 48)] * 2, [(33, 90)]])
    count, bad = prepare(str(root), str(tmp_path / "mm"), 32, workers=1, max_bad_fraction=0.5)
    assert (count, bad) == (5, [])
    memmap = open_dataset(str(tmp_path / "mm"), 32)
    assert isinstance(memmap, MemmapImages) and memmap.class_names == ["n000", "n001", "n002"]
    folder = ImageFolder(str(root), 32)
    sampler = StepBatches(5, 4, seed=2, start=0, stop=3)
    for a, b in zip(make_loader(memmap, sampler, 0, False), make_loader(folder, sampler, 1, False)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].dtype == torch.uint8 and a[0].shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match="prepared at 32 px"):
        open_dataset(str(tmp_path / "mm"), 64)


def test_prepare_skips_unreadable_images_and_refuses_too_many(tmp_path):
    root = write_folder(tmp_path / "data", [[(40, 40)] * 4, [(40, 40)] * 4])
    (root / "n001" / "img0.png").write_bytes(b"")
    count, bad = prepare(str(root), str(tmp_path / "ok"), 32, workers=1, max_bad_fraction=0.2)
    assert count == 7 and bad == [str(root / "n001" / "img0.png")]
    memmap = MemmapImages(str(tmp_path / "ok"))
    assert len(memmap) == 7 and memmap.labels.tolist() == [0] * 4 + [1] * 3
    assert os.path.getsize(tmp_path / "ok" / "images.u8") == 7 * 3 * 32 * 32
    with pytest.raises(DataError, match="1 of 8 images could not be decoded"):
        prepare(str(root), str(tmp_path / "strict"), 32, workers=1, max_bad_fraction=0.01)
    assert not os.path.exists(tmp_path / "strict" / "meta.json")


def test_prepare_cli_reports_errors_and_writes(tmp_path, capsys):
    from jitfast.prepare import main
    with pytest.raises(SystemExit, match="error: no images found under"):
        (tmp_path / "empty" / "n000").mkdir(parents=True)
        main([str(tmp_path / "empty"), str(tmp_path / "out"), "--image-size", "32"])
    root = write_folder(tmp_path / "data", [[(40, 40)] * 2])
    main([str(root), str(tmp_path / "mm"), "--image-size", "32", "--workers", "1"])
    assert "wrote 2 images of 32 px" in capsys.readouterr().err
    assert len(MemmapImages(str(tmp_path / "mm"))) == 2


def test_model_input_into_a_reused_buffer():
    images = torch.tensor([[[[0, 127, 128, 255]]]], dtype=torch.uint8).expand(2, 3, 4, 4)
    fresh = to_model_input(images)
    assert fresh.dtype == torch.float32 and fresh.min() == -1 and fresh.max() == 1
    assert torch.equal(fresh, images.float() / 127.5 - 1)
    buffer = torch.full(images.shape, float("nan"))
    assert to_model_input(images, out=buffer) is buffer and torch.equal(buffer, fresh)


def write_idx(path, array, gz=None):
    """An IDX file of uint8 `array`: the magic 0x0000080<ndim>, the dimensions, the bytes;
    gzipped when the name ends with .gz (or when gz says so)."""
    data = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() \
        + np.ascontiguousarray(array, np.uint8).tobytes()
    if gz if gz is not None else str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(root, count=6, rows=14, cols=12, prefix="train", gz=True, seed=0):
    """An MNIST-layout pair <prefix>-images-idx3-ubyte[.gz], <prefix>-labels-idx1-ubyte[.gz] of
    random images and labels 0..2; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, rows, cols), dtype=np.uint8)
    labels = (np.arange(count) % 3).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


@pytest.mark.parametrize("size", [16, 12])
def test_idx_images_are_what_the_folder_path_makes_of_grayscale_files(tmp_path, size):
    """Each IDX image becomes what load_image makes of it as a grayscale PNG: centre-cropped
    (14x12 to 12: a crop), upscaled BICUBIC (to 16), RGB; flips mirror it; labels as stored."""
    images, labels = write_mnist(tmp_path / "mnist")
    dataset = open_dataset(str(tmp_path / "mnist"), size)
    assert isinstance(dataset, IdxImages) and len(dataset) == 6
    assert dataset.num_classes == 3 and dataset.class_names == ["0", "1", "2"]
    assert dataset.origin.startswith("train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    items = [(i, i % 2 == 1) for i in (5, 0, 3, 2)]
    batch, y, bad = dataset.__getitems__(items)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, size, size) and bad == []
    assert y.dtype == torch.int64 and y.tolist() == [labels[i] for i, _ in items]
    for image, (i, flip) in zip(batch, items):
        Image.fromarray(images[i]).save(tmp_path / "gray.png")
        want = torch.from_numpy(load_image(tmp_path / "gray.png", size).copy())
        assert torch.equal(image, want.flip(-1) if flip else want)


def test_idx_through_loader_workers_and_prepare(tmp_path):
    """An IDX dataset batches in DataLoader workers as in this process, and prepare writes
    the same images and labels as a memmap (class names kept)."""
    write_mnist(tmp_path / "mnist", count=9, gz=False)
    dataset = open_dataset(str(tmp_path / "mnist"), 16)
    sampler = StepBatches(9, 4, seed=1, start=0, stop=4)
    count, bad = prepare(str(tmp_path / "mnist"), str(tmp_path / "mm"), 16)
    assert (count, bad) == (9, [])
    memmap = open_dataset(str(tmp_path / "mm"), 16)
    assert memmap.class_names == ["0", "1", "2"]
    loaders = [make_loader(d, sampler, w) for d, w in ((dataset, 0), (dataset, 2), (memmap, 0))]
    for here, workers, prepared in zip(*loaders, strict=True):
        for other in (workers, prepared):
            assert torch.equal(here[0], other[0]) and torch.equal(here[1], other[1])


def test_idx_pair_choice(tmp_path):
    """A folder trains on its train- pair, else on its only pair; an images file names its
    pair; several candidate sets are refused with the way to choose one."""
    train, _ = write_mnist(tmp_path / "both", count=4, seed=1)
    write_mnist(tmp_path / "both", count=5, prefix="t10k", seed=2)
    both = open_dataset(str(tmp_path / "both"), 12)
    assert len(both) == 4 and "other sets there: t10k" in both.origin
    test = open_dataset(str(tmp_path / "both" / "t10k-images-idx3-ubyte.gz"), 12)
    assert len(test) == 5
    write_mnist(tmp_path / "one", count=3, prefix="t10k", gz=False)
    assert len(open_dataset(str(tmp_path / "one"), 12)) == 3
    for split in ("balanced", "letters"):
        write_mnist(tmp_path / "emnist", prefix=f"emnist-{split}-train")
    with pytest.raises(DataError, match=r"holds the IDX files of 2 sets \(emnist-balanced-train, "
                                        r"emnist-letters-train\) and 2 are training splits: "
                                        r"give the images file of the one to use"):
        open_dataset(str(tmp_path / "emnist"), 12)
    with pytest.raises(DataError, match="is an IDX labels file: give its images file"):
        open_dataset(str(tmp_path / "one" / "t10k-labels-idx1-ubyte"), 12)


def test_emnist_images_are_turned_upright(tmp_path):
    """EMNIST stores its images transposed (torchvision turns them back); other sets do not."""
    images, _ = write_mnist(tmp_path, rows=12, cols=12, prefix="emnist-digits-train")
    dataset = open_dataset(str(tmp_path / "emnist-digits-train-images-idx3-ubyte.gz"), 12)
    assert np.array_equal(dataset.images, images.transpose(0, 2, 1))


def test_fashion_mnist_is_named_by_its_labels(tmp_path, monkeypatch):
    """The class names are Fashion-MNIST's when the whole label sequence is one of its files'
    (checked by hash; here a stand-in hash), otherwise the label values."""
    _, labels = write_mnist(tmp_path, count=10)
    assert idx.class_names(labels) == ["0", "1", "2"]
    digest = hashlib.sha256(labels.tobytes()).hexdigest()
    monkeypatch.setattr(idx, "FASHION_LABELS_SHA256", (digest,))
    assert open_dataset(str(tmp_path), 14).class_names == list(idx.FASHION_NAMES)


def swap(a, b):
    a.rename(a.with_suffix(".tmp"))
    b.rename(a)
    a.with_suffix(".tmp").rename(b)


def corrupt(root, name, change):
    path = root / name
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "train-labels-idx1-ubyte.gz").unlink(),
     r"train-images-idx3-ubyte.gz' has no labels file beside it \(expected .*"
     r"train-labels-idx1-ubyte\[.gz\]\)"),
    (lambda root: (root / "train-images-idx3-ubyte.gz").unlink(),
     r"train-labels-idx1-ubyte.gz' has no images file beside it"),
    (lambda root: swap(root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"),
     r"is not an IDX images file: its magic number is 0x00000801, not 0x00000803 \(it is an "
     r"IDX labels file: are the file names swapped\?\)"),
    (lambda root: corrupt(root, "train-images-idx3-ubyte.gz",
                          lambda b: gzip.compress(b"\x12\x34" + gzip.decompress(b)[2:])),
     r"its magic number is 0x12340803, not 0x00000803 \(is it an IDX file at all\?\)"),
    (lambda root: corrupt(root, "train-images-idx3-ubyte.gz",
                          lambda b: gzip.compress(gzip.decompress(b)[:-7])),
     r"is truncated: its header announces 6 x 14 x 12 images \(1024 bytes\), the file holds "
     r"1017 bytes; download it again"),
    (lambda root: corrupt(root, "train-labels-idx1-ubyte.gz",
                          lambda b: gzip.compress(gzip.decompress(b) + b"\0")),
     r"is longer than its header says"),
    (lambda root: corrupt(root, "train-images-idx3-ubyte.gz", lambda b: b[:len(b) // 2]),
     r"is a corrupt or truncated gzip file \(.*\): download it again"),
    (lambda root: corrupt(root, "train-images-idx3-ubyte.gz", lambda b: b[:10] + b"\xff" * 20),
     r"is a corrupt or truncated gzip file"),
    (lambda root: write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8)),
     r"holds 6 images but .*train-labels-idx1-ubyte.gz' 5 labels: the files are not a pair"),
    (lambda root: corrupt(root, "train-images-idx3-ubyte.gz", lambda b: b"\0\0\x08"),
     r"is truncated: 3 bytes, less than the 16-byte IDX header"),
])
def test_bad_idx_files_say_what_is_wrong(tmp_path, damage, message):
    write_mnist(tmp_path / "mnist")
    damage(tmp_path / "mnist")
    with pytest.raises(DataError, match=message):
        open_dataset(str(tmp_path / "mnist"), 16)


def test_prepare_cli_takes_idx_files(tmp_path, capsys):
    from jitfast.prepare import main
    write_mnist(tmp_path / "mnist", count=5)
    main([str(tmp_path / "mnist"), str(tmp_path / "mm"), "--image-size", "16"])
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz in" in err
    assert "wrote 5 images of 16 px" in err
    corrupt(tmp_path / "mnist", "train-labels-idx1-ubyte.gz", lambda b: b[:-3])
    with pytest.raises(SystemExit, match="error: .*corrupt or truncated gzip file"):
        main([str(tmp_path / "mnist"), str(tmp_path / "mm2"), "--image-size", "16"])


def test_a_flat_folder_is_an_unconditional_dataset(tmp_path):
    """Images directly in the folder: no classes (labels 0, the null class of a model with
    num_classes = 0); grayscale and RGBA files become RGB; prepare keeps it unconditional."""
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    root.mkdir()
    for i, (mode, channels) in enumerate((("RGB", (3,)), ("L", ()), ("RGBA", (4,)))):
        pixels = rng.integers(0, 256, (20, 18, *channels), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(root / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()  # a subfolder without images does not make classes
    dataset = open_dataset(str(root), 16)
    assert isinstance(dataset, ImageFolder) and len(dataset) == 3
    assert (dataset.num_classes, dataset.class_names, dataset.labels) == (0, [], [0, 0, 0])
    image, label, _ = dataset[(1, False)]
    assert image.shape == (3, 16, 16) and label == 0
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # gray
    prepare(str(root), str(tmp_path / "mm"), 16, workers=1)
    memmap = open_dataset(str(tmp_path / "mm"), 16)
    assert memmap.num_classes == 0 and memmap.labels.tolist() == [0, 0, 0]


def test_unconditional_folder_errors(tmp_path):
    mixed = write_folder(tmp_path / "mixed", [[(20, 20)] * 2, [(20, 20)]])
    Image.new("RGB", (20, 20)).save(mixed / "loose.png")
    with pytest.raises(DataError, match=r"holds both images \(1, e.g. loose.png\) and subfolders "
                                        r"of images \(2, e.g. n000/\): put every image in a "
                                        r"class subfolder .* or all of them directly in one "
                                        r"folder without subfolders \(an unconditional model\)"):
        open_dataset(str(mixed), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*: expected one subfolder per "
                                        r"class, or the images directly in it \(unconditional\)"):
        open_dataset(str(tmp_path / "empty"), 16)
