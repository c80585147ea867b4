"""The top-k path of the drop-in ``VectorQuantize``: ``forward(x, topk=k)``.

The search itself is the codebook's (a running top-k over code tiles for k > 1, the
fused search for k = 1); what follows it differs from the single-code path: a loss per
row and candidate (vector-quantize-pytorch's beam-search scores), the estimator applied
to each of the k codes, and the mask broadcast over them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def finish_topk(layer, x, quantize, indices, mask, orig_input, freeze, input_requires_grad):
    """The rest of ``layer.forward`` (a VectorQuantize with heads = 1) for ``topk``.

    x (B, N, D) float rows in codebook space, quantize (B, N, k, D) their k nearest codes in
    x's dtype, indices (B, N, k) int64, mask (B, N) bool or None, orig_input (B, N, dim) the
    layer's input -> (quantize (B, N, k, dim), indices (B, N, k) int64 with -1 where masked,
    loss (B, N, k) float32 per row and candidate (a scalar 0 in training without a loss term),
    the commitment term and the orthogonal term)."""
    xk = x.unsqueeze(-2).expand_as(quantize)
    commit_quantize = quantize
    if layer.training:
        commit_quantize = quantize if layer.learnable_codebook and not freeze else quantize.detach()
        if input_requires_grad and layer.route_gradients_to_input:
            quantize = layer._straight_through(xk, quantize)
        quantize = layer._sync_update(quantize)
    # One loss per row and candidate (vector_quantize_pytorch's beam-search scores).
    per_code = F.mse_loss(commit_quantize, xk, reduction="none").mean(-1)
    if mask is not None:
        per_code = torch.where(mask.unsqueeze(-1), per_code, torch.zeros_like(per_code))
    weighted = per_code * layer.commitment_weight if layer.has_commitment_loss else per_code
    orthogonal = layer.zero
    if layer.training:
        loss = layer.zero if torch.compiler.is_compiling() else layer.zero.clone().requires_grad_()
        commit_loss = per_code if layer.has_commitment_loss else layer.zero
        if layer.has_commitment_loss:
            loss = loss + weighted
        if layer.has_codebook_orthogonal_loss:
            orthogonal = layer._orthogonal_loss(indices)
            loss = loss + orthogonal * layer.orthogonal_reg_weight
    else:
        loss, commit_loss = weighted, per_code
    quantize = layer.project_out(quantize)
    if mask is not None:
        padding = torch.zeros_like(orig_input) if layer.return_zeros_for_masked_padding else orig_input
        quantize = torch.where(mask[..., None, None], quantize, padding.unsqueeze(-2).expand_as(quantize))
        indices = indices.masked_fill(~mask.unsqueeze(-1), -1)
    return quantize, indices, loss, commit_loss, orthogonal
