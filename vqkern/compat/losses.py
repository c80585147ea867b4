"""Cross-entropy of given codes over softmax(logits), streamed over code tiles.

vector-quantize-pytorch's ``commitment_use_cross_entropy_loss`` and forward
``indices=`` (naturalspeech2's loss on residual-VQ latents) take
``F.cross_entropy`` of the full (N, K) logit matrix, logits being ``-|x - e|``
(or ``x . e`` for the cosine metric). Per row that is ``logsumexp_j(l_j) - l_t``,
and the log-sum-exp is computed online over code tiles (a running maximum and
a rescaled running sum), so only one (rows x codes) tile ever exists. The
backward recomputes each tile's logits, forms ``p - onehot`` there and
accumulates the gradients of x and of the codebook as two small matmuls per
tile: never N x K either, at the price of recomputing the logits once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import TILE_BYTES, _logits


def _blocks(n: int, k: int, tile_bytes: int | None):
    budget = max(1, (TILE_BYTES if tile_bytes is None else tile_bytes) // 4)
    tile_codes = max(1, min(k, budget // max(1, min(n, 1024))))
    tile_rows = max(1, min(n, budget // tile_codes))
    return tile_rows, tile_codes


def _target_logits(x: Tensor, x_sq: Tensor, codes: Tensor, cosine: bool) -> Tensor:
    """Row-wise logits of x (M, D) against its own target code codes (M, D), as in _logits."""
    dots = (x * codes).sum(-1)
    if cosine:
        return dots
    return -(x_sq + codes.square().sum(-1) - 2 * dots).clamp(min=1e-8).sqrt()


class _StreamingCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, embed, target, cosine, tile_bytes):
        valid = target >= 0
        safe = target.clamp(min=0)
        n, k = x.shape[0], embed.shape[0]
        lse = torch.empty(n, device=x.device)
        tile_rows, tile_codes = _blocks(n, k, tile_bytes)
        for r0 in range(0, n, tile_rows):
            xr = x[r0:r0 + tile_rows]
            xr_sq = xr.square().sum(-1)
            run_max = torch.full((xr.shape[0],), float("-inf"), device=x.device)
            run_sum = torch.zeros(xr.shape[0], device=x.device)
            for c0 in range(0, k, tile_codes):
                logits = _logits(xr, xr_sq, embed[c0:c0 + tile_codes], cosine)
                new_max = torch.maximum(run_max, logits.max(dim=1).values)
                run_sum = run_sum * (run_max - new_max).exp() + (logits - new_max.unsqueeze(1)).exp().sum(1)
                run_max = new_max
            lse[r0:r0 + tile_rows] = run_max + run_sum.log()
        target_logit = _target_logits(x, x.square().sum(-1), embed[safe], cosine)
        ctx.save_for_backward(x, embed, safe, valid, lse)
        ctx.cosine, ctx.tile_bytes = cosine, tile_bytes
        return torch.where(valid, lse - target_logit, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad):
        x, embed, safe, valid, lse = ctx.saved_tensors
        cosine = ctx.cosine
        g = torch.where(valid, grad, torch.zeros_like(grad))
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_e = torch.zeros_like(embed) if ctx.needs_input_grad[1] else None
        n, k = x.shape[0], embed.shape[0]
        tile_rows, tile_codes = _blocks(n, k, ctx.tile_bytes)
        for r0 in range(0, n, tile_rows):
            xr, gr, tr = x[r0:r0 + tile_rows], g[r0:r0 + tile_rows], safe[r0:r0 + tile_rows]
            xr_sq = xr.square().sum(-1)
            rows = torch.arange(xr.shape[0], device=x.device)
            for c0 in range(0, k, tile_codes):
                codes = embed[c0:c0 + tile_codes]
                logits = _logits(xr, xr_sq, codes, cosine)
                # d loss / d logit = g * (softmax - onehot(target)).
                w = (logits - lse[r0:r0 + tile_rows].unsqueeze(1)).exp_().mul_(gr.unsqueeze(1))
                here = (tr >= c0) & (tr < c0 + codes.shape[0])
                w[rows[here], tr[here] - c0] -= gr[here]
                if not cosine:
                    # logit = -|x - e| (clamped at 1e-4, where autograd passes no gradient):
                    # d logit / d x = -(x - e) / |x - e|, d logit / d e = (x - e) / |x - e|.
                    dist = -logits
                    w = torch.where(dist > 1e-4, w / dist, torch.zeros_like(w))
                    if grad_x is not None:
                        grad_x[r0:r0 + tile_rows] -= xr * w.sum(1, keepdim=True) - w @ codes
                    if grad_e is not None:
                        grad_e[c0:c0 + codes.shape[0]] -= codes * w.sum(0).unsqueeze(1) - w.t() @ xr
                else:
                    if grad_x is not None:
                        grad_x[r0:r0 + tile_rows] += w @ codes
                    if grad_e is not None:
                        grad_e[c0:c0 + codes.shape[0]] += w.t() @ xr
        return grad_x, grad_e, None, None, None


def code_cross_entropy(x: Tensor, embed: Tensor, target: Tensor, *, cosine: bool = False,
                       tile_bytes: int | None = None) -> Tensor:
    """Per-row cross-entropy of the target codes over softmax(logits), logits ``-|x - e|``
    (or ``x . e`` with ``cosine``), streamed over code tiles.

    Args:
        x: (M, D) float32 rows (gradient flows to them).
        embed: (K, D) float32 codes (gradient flows to them when they require it).
        target: (M,) int64 in [0, K), or -1 for a row that takes no part.
        tile_bytes: bound on one tile of logits (default ``vqkern.compat.sampling.TILE_BYTES``).
    Returns:
        (M,) float32: ``logsumexp_j(logit_j) - logit_target``, 0 where target is -1.
        Memory O(M + K + tile), never M x K (forward and backward).
    """
    if target.shape != x.shape[:1]:
        raise ValueError(f"indices must give one code per row: expected {tuple(x.shape[:1])}, got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < -1 or int(target.max()) >= embed.shape[0]):
        raise ValueError(f"indices must lie in [0, {embed.shape[0]}) or be -1 (ignored)")
    return _StreamingCrossEntropy.apply(x.float(), embed.float(), target, cosine, tile_bytes)


def mean_cross_entropy(x: Tensor, embed: Tensor, target: Tensor, *, cosine: bool = False) -> Tensor:
    """Mean of :func:`code_cross_entropy` over the rows whose target is not -1, as
    ``F.cross_entropy(..., ignore_index=-1)`` (NaN when every target is -1).

    x (C, M, D), embed (C, K, D), target (C, M): one codebook per leading index."""
    total = sum(code_cross_entropy(x[c], embed[c], target[c], cosine=cosine).sum() for c in range(x.shape[0]))
    return total / (target >= 0).sum()
