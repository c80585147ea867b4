"""Stochastic code choice (``stochastic_sample_codes``) without the N x K matrix.

vector-quantize-pytorch draws each row's code from softmax(logits / T) with the
Gumbel-max trick on the full (N, K) logit matrix, logits being the negative
Euclidean distance ``-|x - e|`` (or the cosine similarity ``x . e`` for unit
vectors). The argmax of ``logits / T + G`` with G i.i.d. standard Gumbel is an
exact sample from that softmax, and an argmax splits over any partition of the
codes: the maximum over code tiles, kept as a running (best score, best index)
pair per row, is the maximum over all K. So this module walks code tiles of a
bounded number of elements, draws the Gumbel noise of each tile when it needs
it, and never holds more than one (rows x codes) tile.

This is a PyTorch-level loop over tiles (a first step): the fused search kernels
do not sample yet, so each tile is a matmul plus elementwise work in PyTorch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

# One tile of scores and noise stays under this many bytes (fp32) whatever N and K
# are; 16 MiB keeps a tile's noise and scores in a CPU's last-level cache slice.
TILE_BYTES = int(os.environ.get("VQKERN_SAMPLE_TILE_BYTES", 16 << 20))


def _logits(x: Tensor, x_sq: Tensor, codes: Tensor, cosine: bool) -> Tensor:
    """(R, D) x (C, D) -> (R, C) float32 logits as vector_quantize_pytorch defines them."""
    dots = x @ codes.t()
    if cosine:
        return dots
    # The same expansion and clamp as vector_quantize_pytorch's cdist, so the
    # distribution sampled from is the same to rounding.
    sq = (x_sq.unsqueeze(1) + codes.square().sum(-1).unsqueeze(0) - 2 * dots).clamp_(min=1e-8)
    return sq.sqrt_().neg_()


def _gumbel_(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill t with standard Gumbel noise in place: -log(-log(u)), u ~ U(0, 1) clamped as upstream."""
    t.uniform_(0, 1, generator=generator)
    return t.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()


@torch.no_grad()
def gumbel_sample_codes(x: Tensor, codebook: Tensor, temperature: float, *, cosine: bool = False,
                        generator: torch.Generator | None = None, tile_bytes: int | None = None) -> Tensor:
    """One code per row of x, drawn from softmax(logits / temperature) over the codebook.

    Args:
        x: (N, D) float rows (l2-normalized by the caller for the cosine metric).
        codebook: (K, D) float codes.
        temperature: T > 0; as T -> 0 the draw tends to the nearest code.
        cosine: logits are ``x . e`` (else ``-|x - e|``).
        generator: optional torch.Generator for the noise (else the global one).
        tile_bytes: bound on one tile of scores (default ``TILE_BYTES``).
    Returns:
        (N,) int64 code indices. Memory: O(N + tile) beyond the inputs, never N x K.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, k = x.shape[0], codebook.shape[0]
    x = x.float()
    codebook = codebook.float()
    out = torch.zeros(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    budget = max(1, (TILE_BYTES if tile_bytes is None else tile_bytes) // 4)
    tile_codes = max(1, min(k, budget // max(1, min(n, 1024))))
    tile_rows = max(1, min(n, budget // tile_codes))
    inv_t = 1.0 / float(temperature)
    for r0 in range(0, n, tile_rows):
        xr = x[r0:r0 + tile_rows]
        xr_sq = xr.square().sum(-1)
        best = torch.full((xr.shape[0],), float("-inf"), device=x.device)
        best_idx = out[r0:r0 + tile_rows]
        for c0 in range(0, k, tile_codes):
            scores = _logits(xr, xr_sq, codebook[c0:c0 + tile_codes], cosine).mul_(inv_t)
            noise = _gumbel_(torch.empty_like(scores), generator)
            tile_best, tile_idx = scores.add_(noise).max(dim=1)
            # Strictly greater: an exact tie keeps the earlier (lower) code, as argmax does.
            better = tile_best > best
            best = torch.where(better, tile_best, best)
            best_idx.copy_(torch.where(better, tile_idx + c0, best_idx))
    return out


@torch.no_grad()
def topk_codes(x: Tensor, codebook: Tensor, k: int, *, cosine: bool = False, temperature: float = 0.0,
               generator: torch.Generator | None = None, tile_bytes: int | None = None) -> Tensor:
    """The k codes of largest logit per row (nearest first), or of largest
    ``logit / temperature + Gumbel noise`` when temperature > 0 (k draws without
    replacement from softmax(logit / temperature)), kept as a running top-k over code tiles.

    Args:
        x: (N, D) float rows; codebook: (K, D) float codes; 1 <= k <= K.
        cosine, generator, tile_bytes: as :func:`gumbel_sample_codes`.
    Returns:
        (N, k) int64, best first. Memory O(N * k + tile), never N x K.
    """
    n, num_codes = x.shape[0], codebook.shape[0]
    if not 1 <= k <= num_codes:
        raise ValueError(f"topk must lie in [1, {num_codes}], got {k}")
    x, codebook = x.float(), codebook.float()
    out = torch.zeros(n, k, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    budget = max(1, (TILE_BYTES if tile_bytes is None else tile_bytes) // 4)
    tile_codes = max(k, min(num_codes, budget // max(1, min(n, 1024))))
    tile_rows = max(1, min(n, budget // tile_codes))
    for r0 in range(0, n, tile_rows):
        xr = x[r0:r0 + tile_rows]
        xr_sq = xr.square().sum(-1)
        best = best_idx = None
        for c0 in range(0, num_codes, tile_codes):
            scores = _logits(xr, xr_sq, codebook[c0:c0 + tile_codes], cosine)
            if temperature > 0:
                scores = scores.mul_(1.0 / temperature).add_(_gumbel_(torch.empty_like(scores), generator))
            idx = torch.arange(c0, c0 + scores.shape[1], device=x.device).expand_as(scores)
            if best is not None:
                scores, idx = torch.cat([best, scores], dim=1), torch.cat([best_idx, idx], dim=1)
            best, pos = scores.topk(min(k, scores.shape[1]), dim=1)
            best_idx = idx.gather(1, pos)
        out[r0:r0 + tile_rows] = best_idx
    return out
