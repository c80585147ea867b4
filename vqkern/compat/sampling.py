"""Stochastic code choice (``stochastic_sample_codes``) and top-k without the N x K matrix.

vector-quantize-pytorch draws each row's code from softmax(logits / T) with the
Gumbel-max trick on the full (N, K) logit matrix, logits being the negative
Euclidean distance ``-|x - e|`` (or the cosine similarity ``x . e`` for unit
vectors). The argmax of ``logits / T + G`` with G i.i.d. standard Gumbel is an
exact sample from that softmax, and an argmax splits over any partition of the
codes, so ``vqkern.sample_code`` draws it inside the search: the fused Triton
kernel adds Philox noise to each tile's logits, the torch backend walks code
tiles. The top-k here is a PyTorch-level running top-k over code tiles.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .._gumbel import gumbel_, logits

# One tile of scores and noise stays under this many bytes (fp32) whatever N and K
# are; 16 MiB keeps a tile's noise and scores in a CPU's last-level cache slice.
TILE_BYTES = int(os.environ.get("VQKERN_SAMPLE_TILE_BYTES", 16 << 20))


def gumbel_sample_codes(x: Tensor, codebook: Tensor, temperature: float, *, cosine: bool = False,
                        generator: torch.Generator | None = None, backend: str = "auto") -> Tensor:
    """One code per row of x, drawn from softmax(logits / temperature) over the codebook,
    by ``vqkern.sample_code`` (the fused search's Gumbel-max on the Triton backend, code
    tiles on the torch backend), seeded from ``generator`` (or torch's global one).

    Args:
        x: (N, D) float rows (l2-normalized by the caller for the cosine metric).
        codebook: (K, D) float codes.
        temperature: T > 0; as T -> 0 the draw tends to the nearest code.
        cosine: logits are ``x . e`` (else ``-|x - e|``).
        generator: optional CPU torch.Generator the seed is drawn from.
    Returns:
        (N,) int64 code indices. Memory: O(N + tile) beyond the inputs, never N x K.
    """
    from ..functional import sample_code

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    indices, _ = sample_code(x, codebook, temperature, metric="cosine" if cosine else "l2", seed=seed,
                             backend=backend)
    return indices


@torch.no_grad()
def topk_codes(x: Tensor, codebook: Tensor, k: int, *, cosine: bool = False, temperature: float = 0.0,
               generator: torch.Generator | None = None, tile_bytes: int | None = None) -> Tensor:
    """The k codes of largest logit per row (nearest first), or of largest
    ``logit / temperature + Gumbel noise`` when temperature > 0 (k draws without
    replacement from softmax(logit / temperature)), kept as a running top-k over code tiles.

    Args:
        x: (N, D) float rows; codebook: (K, D) float codes; 1 <= k <= K.
        cosine: logits are ``x . e`` (else ``-|x - e|``); generator: for the noise; tile_bytes:
            bound on one tile of scores (default ``TILE_BYTES``).
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
            scores = logits(xr, xr_sq, codebook[c0:c0 + tile_codes], cosine)
            if temperature > 0:
                scores = scores.mul_(1.0 / temperature).add_(gumbel_(torch.empty_like(scores), generator))
            idx = torch.arange(c0, c0 + scores.shape[1], device=x.device).expand_as(scores)
            if best is not None:
                scores, idx = torch.cat([best, scores], dim=1), torch.cat([best_idx, idx], dim=1)
            best, pos = scores.topk(min(k, scores.shape[1]), dim=1)
            best_idx = idx.gather(1, pos)
        out[r0:r0 + tile_rows] = best_idx
    return out
