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
import torch
import torch.nn as nn

from jitfast.shapes import ShapesDataset


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
