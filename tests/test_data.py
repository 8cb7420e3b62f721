"""Datasets and loaders: the built-in shapes, the batch order, image folders and memmaps."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from jitfast.io.images import to_uint8
from jitfast.prepare import prepare
from jitfast.training.data import (DataError, ImageFolder, MemmapImages, StepBatches,
                                   center_crop_arr, make_loader, open_dataset, to_model_input)
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
