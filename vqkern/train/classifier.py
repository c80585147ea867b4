"""Does the prompt control the image? A small classifier judges the samples of a conditional prior.

The classifier (two convolutions, one hidden layer) is trained once on the real
training images and cached as OUT/classifier.pt. Prompt accuracy is the fraction
of images drawn for a class's name that it assigns to that class; its ceiling is
the classifier's accuracy on the VQ-VAE's reconstructions of real test images,
the best a prior can reach through that decoder.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stage1 import batch_indices, to_input


class Classifier(nn.Module):
    """uint8-derived images (B, C, H, W) float in [-0.5, 0.5], H and W multiples of 4 -> logits (B, num_classes)."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Float images (N, C, H, W) in [-0.5, 0.5] -> predicted class (N,) int64 on CPU."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(images), batch_size)])


def load_or_train(path: Path, train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                  test_labels: np.ndarray, classes: tuple[str, ...], device: torch.device, *, steps: int = 1500,
                  batch_size: int = 128, seed: int = 0) -> tuple[Classifier, dict]:
    """The classifier cached at path if it was trained for these classes and image shape, else a new one.

    Returns (model in eval mode, info) where info holds its held-out accuracy on
    the real test images and how it was trained.
    """
    shape = tuple(train.shape[1:])
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if tuple(ckpt["classes"]) == tuple(classes) and tuple(ckpt["shape"]) == shape:
            model = Classifier(*shape, len(classes))
            model.load_state_dict(ckpt["model"])
            return model.to(device).eval(), ckpt["info"]
    torch.manual_seed(seed)
    model = Classifier(*shape, len(classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    labels = torch.from_numpy(train_labels)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        rows = batch_indices(step, len(train), batch_size, seed)
        loss = F.cross_entropy(model(to_input(train[rows], device)), labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    accuracy = float((predict(model, to_input(test, device)) == torch.from_numpy(test_labels)).double().mean())
    info = {"test_accuracy": accuracy, "steps": steps, "batch_size": batch_size, "train_s": seconds,
            "test_images": len(test)}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "classes": tuple(classes), "shape": shape, "info": info}, tmp)
    tmp.replace(path)  # two priors evaluated at once never read a torn file
    return model.eval(), info


@torch.no_grad()
def reconstruction_accuracy(classifier: nn.Module, vqvae: nn.Module, test: np.ndarray, test_labels: np.ndarray,
                            num_classes: int, device: torch.device, batch_size: int = 500) -> tuple[float, list[float]]:
    """The ceiling: accuracy of the classifier on the VQ-VAE's reconstructions of the real test images.

    Returns (over all test images, per class: over that class's test images; NaN for a class with none).
    """
    vqvae.eval()
    preds = []
    for i in range(0, len(test), batch_size):
        preds.append(predict(classifier, vqvae(to_input(test[i:i + batch_size], device))[0].clamp(-0.5, 0.5)))
    labels = torch.from_numpy(test_labels)
    hit = (torch.cat(preds) == labels).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hit)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return float(hit.mean()), (per_class / counts).tolist()
