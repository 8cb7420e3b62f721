"""The built-in Fashion-MNIST subset: the images of the published files, in their order, class
balanced, the judge's images apart from the training ones, and a clear error when a file is
missing or damaged."""
import hashlib
import lzma

import numpy as np
import pytest

from jitfast.training import fashion
from jitfast.training.data import DataError, IdxImages, open_dataset
from jitfast.training.idx import FASHION_NAMES

# The first labels of Fashion-MNIST's published train and t10k files: the subsets keep the file
# order, and these images are among the first of their classes
TRAIN_FIRST = [9, 0, 0, 3, 0, 2, 7, 2]
T10K_FIRST = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


@pytest.mark.parametrize("split, first, per_class", [("train", TRAIN_FIRST, 300),
                                                     ("judge", T10K_FIRST, 500)])
def test_the_subsets_are_the_published_images_in_order(split, first, per_class):
    images, labels = fashion.load_split(split)
    assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
    assert labels[:len(first)].tolist() == first
    assert np.bincount(labels).tolist() == [per_class] * 10
    assert not images.flags.writeable  # shared by every dataset built on them
    assert 60 < images.mean() < 90  # dark backgrounds, bright clothes: not noise, not blank


def test_no_image_of_the_judge_split_is_a_training_image():
    digest = lambda images: {hashlib.sha1(image.tobytes()).digest() for image in images}
    assert not digest(fashion.load_split("train")[0]) & digest(fashion.load_split("judge")[0])


def test_training_on_nothing_given_takes_the_subset():
    dataset = open_dataset(None, 28)
    assert isinstance(dataset, IdxImages) and dataset.class_names == list(FASHION_NAMES)
    assert "built-in Fashion-MNIST subset (3000 images" in dataset.origin
    images, labels, _ = dataset.__getitems__([(0, False), (1, True)])
    train, _ = fashion.load_split("train")
    assert images.shape == (2, 3, 28, 28)
    assert (images[0, 0].numpy() == train[0]).all()
    assert (images[1, 2].numpy() == train[1][:, ::-1]).all()  # flipped, grey into RGB


def test_a_damaged_file_is_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "FOLDER", str(tmp_path))
    fashion.load_split.cache_clear()
    (tmp_path / "train.npz.xz").write_bytes(lzma.compress(b"not an npz"))
    try:
        with pytest.raises(DataError, match=r"train.npz.xz' cannot be read .*reinstall jitfast"):
            open_dataset(None, 28)
        with pytest.raises(FileNotFoundError, match="judge.npz.xz' cannot be read"):
            fashion.load_split("judge")
    finally:
        fashion.load_split.cache_clear()
