"""A small CNN classifier of the built-in shapes dataset, the judge of generated samples: class
accuracy of class-conditional samples, and a Fréchet distance in its feature space (an FID with
this CNN in place of Inception).

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
    """A trained classifier with its reference: its accuracy on `count` held-out real images and
    the Fréchet distance between two such sets (the floor of a distance at that sample size)."""

    def __init__(self, classifier, size, count, seed):
        self.classifier = classifier.eval()
        real, labels = ShapesDataset(size, count, seed=seed + 1).batch(range(count))
        more_real, _ = ShapesDataset(size, count, seed=seed + 2).batch(range(count))
        self.real_accuracy, self.real_features = judge(self.classifier, real, labels)
        self.floor = frechet_distance(judge(self.classifier, more_real, labels)[1],
                                      self.real_features)

    def score(self, images, labels):
        """{"accuracy", "frechet"} of images (B, 3, H, W) in [-1, 1] of classes labels (B,)."""
        accuracy, features = judge(self.classifier, images, labels)
        return {"accuracy": accuracy, "frechet": frechet_distance(features, self.real_features)}

    def reference(self):
        return {"accuracy": self.real_accuracy, "frechet": self.floor}


def trained_judges(size, count, seed=1, steps=None, cache=None):
    """{"colour": Judge, "colour-blind": Judge} at `size` px, classifiers trained with `seed`
    (steps: {name: steps}, default JUDGE_STEPS) and referenced on `count` real images of seeds
    seed + 1 and seed + 2. With `cache` (a folder) each trained classifier is kept there and
    read back by a later call with the same size, steps and seed."""
    judges = {}
    for name, n in (steps or JUDGE_STEPS).items():
        path = cache and os.path.join(cache, f"judge-{name}-{size}px-{n}steps-seed{seed}.pt")
        classifier = ShapesClassifier()
        if path and os.path.exists(path):
            classifier.load_state_dict(torch.load(path, weights_only=True))
        else:
            classifier = train_classifier(size, n, seed=seed, colour_blind=name != "colour")
            if path:
                os.makedirs(cache, exist_ok=True)
                atomic_save(classifier.state_dict(), path)
        judges[name] = Judge(classifier, size, count, seed)
    return judges
