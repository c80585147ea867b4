"""Pictures the training script writes: image grids (Pillow), curves and histograms (matplotlib)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Float images (N, C, H, W) centred on 0 (pixels in [-0.5, 0.5]) -> uint8 (N, C, H, W)."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    return np.clip(np.rint((arr + 0.5) * 255), 0, 255).astype(np.uint8)


def grid_size(n: int, columns: int, height: int, width: int, *, pad: int = 2, scale: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`save_grid` writes for n images."""
    rows = -(-n // columns)
    return (columns * (width * scale + pad) + pad, rows * (height * scale + pad) + pad)


def save_grid(images: np.ndarray, path: str | Path, *, columns: int, pad: int = 2, scale: int = 2) -> Path:
    """Write uint8 images (N, C, H, W), C = 1 or 3, as one PNG grid, row-major, upscaled ``scale`` times."""
    from PIL import Image

    n, c, h, w = images.shape
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    width, height = grid_size(n, columns, h // scale, w // scale, pad=pad, scale=scale)
    canvas = np.full((c, height, width), 255, np.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[k]
    mode_img = canvas[0] if c == 1 else canvas.transpose(1, 2, 0)
    path = Path(path)
    Image.fromarray(mode_img).save(path)
    return path


def interleave_rows(originals: np.ndarray, reconstructions: np.ndarray, columns: int) -> np.ndarray:
    """Rows of originals followed by the matching rows of reconstructions, for a comparison grid."""
    blocks = []
    for start in range(0, originals.shape[0], columns):
        blocks += [originals[start:start + columns], reconstructions[start:start + columns]]
    return np.concatenate(blocks)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Loss, reconstruction error and perplexity against step for one or more runs (name -> records)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, records in runs.items():
        steps = [r["step"] for r in records]
        for ax, key in zip(axes, ("loss", "recon", "perplexity")):
            ax.plot(steps, [r[key] for r in records], label=name, linewidth=0.9, alpha=0.85)
    for ax, label in zip(axes, ("training loss", "reconstruction MSE", "batch perplexity")):
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if len(runs) > 1:
        axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_usage(counts: np.ndarray, path: str | Path, title: str) -> Path:
    """Codebook usage histogram: per-code counts (K,) sorted from most to least used."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    order = np.sort(counts)[::-1]
    ax.bar(np.arange(order.size), order, width=1.0)
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("held-out positions")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
