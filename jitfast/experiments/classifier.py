"""A small CNN classifier, the judge of generated samples: class accuracy of class-conditional
samples, and a Fréchet distance in its feature space (an FID with this CNN in place of
Inception). Judges of the built-in shapes (``trained_judges``) and of the built-in Fashion-MNIST
subset (``fashion_judges``: trained on images of its test split, which no model trains on).

Every class of the built-in data has its own colour, so this judge can score blobs of the right
colour high. Its colour-blind twin (``train_classifier(..., colour_blind=True)``) is the same CNN
trained on images whose channels are permuted and negated at random (one permutation and one
sign per image, ``scramble_colours``): hue no longer names the class, the shape has to. It
scores images as they are, as the colour judge does: the unscrambled image is one of the 12
variants it was trained on. (Channel magnitudes up to order survive the scrambling: it is blind
to hue, not to brightness or saturation.)
"""
import os

import torch
import torch.nn as nn

from jitfast.io.checkpoint import atomic_save
from jitfast.training.data import IdxImages
from jitfast.training.fashion import load_split
from jitfast.training.idx import FASHION_NAMES
from jitfast.training.shapes import ShapesDataset

# The two judges and their training steps: the colour-blind one needs more to learn shapes.
JUDGE_STEPS = {"colour": 300, "colour-blind": 800}


class ShapesClassifier(nn.Module):
    """Three 3x3 conv layers (two with 2x2 max-pooling), global average pooling to `width`
    features, and a linear layer to the class logits. Works at any image size."""

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, images):
        return self.head(self.features(images))


def scramble_colours(images, generator):
    """Images (B, 3, H, W) in [-1, 1], each with its channels permuted and its sign flipped
    at random."""
    B = images.shape[0]
    perms = torch.argsort(torch.rand(B, 3, generator=generator), dim=1)
    signs = torch.randint(0, 2, (B, 1, 1, 1), generator=generator) * 2.0 - 1.0
    return images[torch.arange(B)[:, None], perms] * signs


def train_classifier(size, steps=300, batch=64, seed=0, colour_blind=False):
    """A ShapesClassifier trained on fresh `size`-px images of ShapesDataset(seed=seed), with
    colour_blind on colour-scrambled ones (``scramble_colours``)."""
    data = ShapesDataset(size, steps * batch, seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesClassifier(data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        images, labels = data.batch(range(step * batch, (step + 1) * batch))
        if colour_blind:
            images = scramble_colours(images, generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def judge(model, images, labels):
    """(accuracy of `model` on images (B, 3, H, W) in [-1, 1] with labels (B,), their features)."""
    features = model.features(images.clamp(-1, 1))
    accuracy = (model.head(features).argmax(1) == labels).float().mean().item()
    return accuracy, features


def frechet_distance(a, b):
    """Fréchet distance of Gaussians fitted to feature sets a (N, F) and b (M, F), as in FID:
    |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


class Judge:
    """A trained classifier with its reference: its accuracy on held-out real images and the
    Fréchet distance between two such sets (the floor of a distance at that sample size)."""

    def __init__(self, classifier, real, labels, more_real):
        self.classifier = classifier.eval()
        self.real_accuracy, self.real_features = judge(self.classifier, real, labels)
        self.floor = frechet_distance(judge(self.classifier, more_real, labels)[1],
                                      self.real_features)

    def score(self, images, labels):
        """{"accuracy", "frechet"} of images (B, 3, H, W) in [-1, 1] of classes labels (B,)."""
        accuracy, features = judge(self.classifier, images, labels)
        return {"accuracy": accuracy, "frechet": frechet_distance(features, self.real_features)}

    def reference(self):
        return {"accuracy": self.real_accuracy, "frechet": self.floor}


def shapes_judge(classifier, size, count, seed):
    """A Judge referenced on `count` real shapes images of seeds seed + 1 and seed + 2."""
    real, labels = ShapesDataset(size, count, seed=seed + 1).batch(range(count))
    more_real, _ = ShapesDataset(size, count, seed=seed + 2).batch(range(count))
    return Judge(classifier, real, labels, more_real)


def cached_classifier(path, train):
    """The classifier saved at `path` (None: no cache), or train() saved there."""
    classifier = ShapesClassifier()
    if path and os.path.exists(path):
        classifier.load_state_dict(torch.load(path, weights_only=True))
        return classifier
    classifier = train()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(classifier.state_dict(), path)
    return classifier


def trained_judges(size, count, seed=1, steps=None, cache=None):
    """{"colour": Judge, "colour-blind": Judge} at `size` px, classifiers trained with `seed`
    (steps: {name: steps}, default JUDGE_STEPS) and referenced on `count` real images of seeds
    seed + 1 and seed + 2. With `cache` (a folder) each trained classifier is kept there and
    read back by a later call with the same size, steps and seed."""
    judges = {}
    for name, n in (steps or JUDGE_STEPS).items():
        path = cache and os.path.join(cache, f"judge-{name}-{size}px-{n}steps-seed{seed}.pt")
        classifier = cached_classifier(path, lambda: train_classifier(
            size, n, seed=seed, colour_blind=name != "colour"))
        judges[name] = shapes_judge(classifier, size, count, seed)
    return judges


def fashion_images(split, size, count=None, offset=0):
    """(images (B, 3, size, size) in [-1, 1], labels (B,)) of the built-in Fashion-MNIST split,
    `count` of them from `offset` (all by default), made as the training data makes them."""
    images, labels = load_split(split)
    data = IdxImages(images, labels, size, FASHION_NAMES)
    stop = len(labels) if count is None else offset + count
    uint8, labels, _ = data.__getitems__([(i, False) for i in range(offset, stop)])
    return uint8.float() / 127.5 - 1, labels


def train_fashion_classifier(size, steps, batch=64, seed=0):
    """A ShapesClassifier trained on the judge split of the built-in Fashion-MNIST subset (its
    test-split images, which no model trains on), Adam with a cosine learning rate."""
    images, labels = fashion_images("judge", size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesClassifier(len(FASHION_NAMES))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        pick = torch.randint(len(labels), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[pick]), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


FASHION_JUDGE_STEPS = 2000


def fashion_judges(size, count, seeds=(0, 1, 2), steps=None, cache=None):
    """{seed: Judge} of the built-in Fashion-MNIST subset at `size` px, one classifier per seed,
    each referenced on `count` real training images and a second, disjoint `count` of them
    (the judges' spread over seeds is the metric's error bar)."""
    steps = steps or FASHION_JUDGE_STEPS
    real, labels = fashion_images("train", size, count)
    more_real, _ = fashion_images("train", size, count, offset=count)
    judges = {}
    for seed in seeds:
        path = cache and os.path.join(cache, f"judge-fashion-{size}px-{steps}steps-seed{seed}.pt")
        classifier = cached_classifier(path, lambda: train_fashion_classifier(size, steps,
                                                                              seed=seed))
        judges[seed] = Judge(classifier, real, labels, more_real)
    return judges
