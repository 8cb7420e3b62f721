"""A small CNN classifier of the built-in shapes dataset, the judge of generated samples: class
accuracy of class-conditional samples, and a Fréchet distance in its feature space (an FID with
this CNN in place of Inception).
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


def train_classifier(size, steps=300, batch=64, seed=0):
    """A ShapesClassifier trained on fresh `size`-px images of ShapesDataset(seed=seed)."""
    data = ShapesDataset(size, steps * batch, seed)
    torch.manual_seed(seed)
    model = ShapesClassifier(data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        images, labels = data.batch(range(step * batch, (step + 1) * batch))
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
