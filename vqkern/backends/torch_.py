"""Chunked PyTorch backend: any device, bounded memory.

The distance block is computed for a chunk of rows at a time so that it stays
under ``VQKERN_TORCH_BLOCK_BYTES`` (64 MB by default) whatever N and K are.
The search ranks codes with the expansion ``|e|^2 - 2 z.e`` (|z|^2 is constant
per row and does not change the argmin), then recomputes the chosen code's
distance exactly from the residual, as the op contract requires.
"""
from __future__ import annotations

import os

import torch

DEFAULT_BLOCK_BYTES = 64 * 2**20


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch runs on every device"


def _block_bytes() -> int:
    return int(os.environ.get("VQKERN_TORCH_BLOCK_BYTES", DEFAULT_BLOCK_BYTES))


def _compute_dtype(z: torch.Tensor, codebook: torch.Tensor) -> torch.dtype:
    # Half-precision matmuls on CPU are slow and lose ranking precision: search in fp32.
    return torch.float32 if z.device.type == "cpu" else torch.promote_types(z.dtype, codebook.dtype)


def residual_distance(z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 ``sum((z - e)^2)`` in fp32, row by row."""
    diff = z.float() - chosen.float()
    return (diff * diff).sum(dim=1)


def search(z, codebook, indices, distances, quantized) -> None:
    n, _ = z.shape
    k = codebook.shape[0]
    dtype = _compute_dtype(z, codebook)
    cb = codebook.to(dtype)
    cb_norm = (cb.float() * cb.float()).sum(dim=1).to(dtype)
    rows = max(1, min(n, _block_bytes() // (4 * k)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        zc = z[start:stop].to(dtype)
        # |e|^2 - 2 z.e in one addmm; ties resolve to the lowest index (torch.argmin).
        scores = torch.addmm(cb_norm, zc, cb.t(), beta=1.0, alpha=-2.0)
        idx = scores.argmin(dim=1)
        indices[start:stop] = idx
    chosen = codebook.index_select(0, indices)
    distances.copy_(residual_distance(z, chosen))
    quantized.copy_(chosen)


def grad_z(grad_quantized, z, codebook, indices, scale, out) -> None:
    chosen = codebook.index_select(0, indices)
    out.copy_(grad_quantized.float() + scale * (z.float() - chosen.float()))


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    # index_add_ on CPU is sequential (deterministic); on CUDA the deterministic
    # mode is honoured through torch's own deterministic kernels.
    ones = torch.ones(indices.shape[0], dtype=torch.float32, device=indices.device)
    counts.index_add_(0, indices, ones)
    sums.index_add_(0, indices, values.float())
