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

from .._gumbel import logits as _logits
from .sampling import TILE_BYTES


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
        tile_rows, tile_codes = _blocks(x.shape[0], embed.shape[0], tile_bytes)
        lse = _row_lse(x, embed, cosine, 1.0, tile_rows, tile_codes)
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
                _logit_grad_(w, logits, xr, codes, cosine, grad_x, grad_e, r0, c0)
        return grad_x, grad_e, None, None, None


def _logit_grad_(w, logits, xr, codes, cosine, grad_x, grad_e, r0, c0):
    """Add the gradients of x and the codes for d loss / d logit = w (rows x codes tile)."""
    if not cosine:
        # logit = -|x - e| (clamped at 1e-4, where autograd passes no gradient):
        # d logit / d x = -(x - e) / |x - e|, d logit / d e = (x - e) / |x - e|.
        dist = -logits
        w = torch.where(dist > 1e-4, w / dist, torch.zeros_like(w))
        if grad_x is not None:
            grad_x[r0:r0 + xr.shape[0]] -= xr * w.sum(1, keepdim=True) - w @ codes
        if grad_e is not None:
            grad_e[c0:c0 + codes.shape[0]] -= codes * w.sum(0).unsqueeze(1) - w.t() @ xr
    else:
        if grad_x is not None:
            grad_x[r0:r0 + xr.shape[0]] += w @ codes
        if grad_e is not None:
            grad_e[c0:c0 + codes.shape[0]] += w.t() @ xr


def _row_lse(x, embed, cosine, scale, tile_rows, tile_codes):
    """(M,) log-sum-exp over codes of scale * logit, online over code tiles."""
    n, k = x.shape[0], embed.shape[0]
    lse = torch.empty(n, device=x.device)
    for r0 in range(0, n, tile_rows):
        xr = x[r0:r0 + tile_rows]
        xr_sq = xr.square().sum(-1)
        run_max = torch.full((xr.shape[0],), float("-inf"), device=x.device)
        run_sum = torch.zeros(xr.shape[0], device=x.device)
        for c0 in range(0, k, tile_codes):
            z = _logits(xr, xr_sq, embed[c0:c0 + tile_codes], cosine) * scale
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            run_sum = run_sum * (run_max - new_max).exp() + (z - new_max.unsqueeze(1)).exp().sum(1)
            run_max = new_max
        lse[r0:r0 + tile_rows] = run_max + run_sum.log()
    return lse


def _tiles(x, embed, cosine, tile_rows, tile_codes):
    """Yield (r0, c0, x tile, code tile, logits tile) over every (rows x codes) tile."""
    for r0 in range(0, x.shape[0], tile_rows):
        xr = x[r0:r0 + tile_rows]
        xr_sq = xr.square().sum(-1)
        for c0 in range(0, embed.shape[0], tile_codes):
            codes = embed[c0:c0 + tile_codes]
            yield r0, c0, xr, codes, _logits(xr, xr_sq, codes, cosine)


class _StreamingDiversity(torch.autograd.Function):
    """-mean_p entropy(mean over codebooks and groups of softmax(T * logits)); x (C, M, D)
    with each codebook's rows laid out (groups, positions), embed (C, K, D)."""

    @staticmethod
    def forward(ctx, x, embed, positions, temperature, cosine, tile_bytes):
        c_count, m, _ = x.shape
        k = embed.shape[1]
        tile_rows, tile_codes = _blocks(m, k, tile_bytes)
        pos = torch.arange(m, device=x.device) % positions
        lse = torch.stack([_row_lse(x[c], embed[c], cosine, temperature, tile_rows, tile_codes)
                           for c in range(c_count)])
        avg = torch.zeros(positions, k, device=x.device)
        for c in range(c_count):
            for r0, c0, xr, codes, logits in _tiles(x[c], embed[c], cosine, tile_rows, tile_codes):
                rows = slice(r0, r0 + xr.shape[0])
                p = (logits * temperature - lse[c, rows].unsqueeze(1)).exp_()
                avg[:, c0:c0 + codes.shape[0]].index_add_(0, pos[rows], p)
        avg /= c_count * (m // positions)
        ctx.save_for_backward(x, embed, lse, avg)
        ctx.cfg = (positions, temperature, cosine, tile_rows, tile_codes)
        return (avg * avg.clamp(min=1e-5).log()).sum(-1).mean()

    @staticmethod
    def backward(ctx, grad):
        x, embed, lse, avg = ctx.saved_tensors
        positions, temperature, cosine, tile_rows, tile_codes = ctx.cfg
        c_count, m, _ = x.shape
        pos = torch.arange(m, device=x.device) % positions
        # d loss / d p_ij for row i at position pos(i): the entropy term's derivative, shared
        # by the rows of one position, divided by the rows the mean runs over.
        g_avg = (avg.clamp(min=1e-5).log() + (avg > 1e-5).float()) * (grad / positions / (c_count * (m // positions)))
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_e = torch.zeros_like(embed) if ctx.needs_input_grad[1] else None
        for c in range(c_count):
            # Softmax backward needs sum_k p_ik g_ik per row: one more pass over the tiles.
            inner = torch.zeros(m, device=x.device)
            for r0, c0, xr, codes, logits in _tiles(x[c], embed[c], cosine, tile_rows, tile_codes):
                rows = slice(r0, r0 + xr.shape[0])
                p = (logits * temperature - lse[c, rows].unsqueeze(1)).exp_()
                inner[rows] += (p * g_avg[pos[rows], c0:c0 + codes.shape[0]]).sum(1)
            gx = None if grad_x is None else grad_x[c]
            ge = None if grad_e is None else grad_e[c]
            for r0, c0, xr, codes, logits in _tiles(x[c], embed[c], cosine, tile_rows, tile_codes):
                rows = slice(r0, r0 + xr.shape[0])
                p = (logits * temperature - lse[c, rows].unsqueeze(1)).exp_()
                w = p * (g_avg[pos[rows], c0:c0 + codes.shape[0]] - inner[rows].unsqueeze(1)) * temperature
                _logit_grad_(w, logits, xr, codes, cosine, gx, ge, r0, c0)
        return grad_x, grad_e, None, None, None, None


def codebook_diversity_loss(x: Tensor, embed: Tensor, *, positions: int, temperature: float, cosine: bool = False,
                            tile_bytes: int | None = None) -> Tensor:
    """vector_quantize_pytorch's codebook diversity loss, streamed over code tiles.

    Args:
        x: (C, M, D) float32 rows of each of C codebooks, laid out as (groups, positions):
            row i sits at position i % positions (the sequence position; groups are batch
            elements and shared heads).
        embed: (C, K, D) float32 codes.
        temperature: the softmax is over ``temperature * logit`` (logits ``-|x - e|``,
            or ``x . e`` with ``cosine``).
    Returns:
        float32 scalar: minus the mean over positions of the entropy of the code
        distribution averaged over codebooks and groups. Memory O(positions x K) for that
        average (the loss is defined on it) plus one tile, never rows x K; the backward
        makes two more passes over the tiles.
    """
    if positions < 1 or x.shape[1] % positions:
        raise ValueError(f"x must have a multiple of positions = {positions} rows, got {x.shape[1]}")
    return _StreamingDiversity.apply(x.float(), embed.float(), positions, float(temperature), cosine, tile_bytes)


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
        raise ValueError(f"indices must give one code per row: expected {tuple(x.shape[:1])}, "
                         f"got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < -1 or int(target.max()) >= embed.shape[0]):
        raise ValueError(f"indices must lie in [0, {embed.shape[0]}) or be -1 (ignored)")
    return _StreamingCrossEntropy.apply(x.float(), embed.float(), target, cosine, tile_bytes)


def mean_cross_entropy(x: Tensor, embed: Tensor, target: Tensor, *, cosine: bool = False) -> Tensor:
    """Mean of :func:`code_cross_entropy` over the rows whose target is not -1, as
    ``F.cross_entropy(..., ignore_index=-1)`` (NaN when every target is -1).

    x (C, M, D), embed (C, K, D), target (C, M): one codebook per leading index."""
    total = sum(code_cross_entropy(x[c], embed[c], target[c], cosine=cosine).sum() for c in range(x.shape[0]))
    return total / (target >= 0).sum()
