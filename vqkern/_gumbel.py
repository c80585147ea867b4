"""Gumbel-max pieces shared by the PyTorch sampling paths (the torch backend's tiled
draw and the drop-in's top-k): logits as vector-quantize-pytorch defines them, and
standard Gumbel noise. Plain tensor math: no backend, no module."""
from __future__ import annotations

import torch
from torch import Tensor


def logits(x: Tensor, x_sq: Tensor, codes: Tensor, cosine: bool) -> Tensor:
    """(R, D) x (C, D) -> (R, C) float32 logits: ``x . e`` for unit vectors (cosine), else
    ``-|x - e|`` from the expansion clamped at 1e-8, as vector-quantize-pytorch's cdist."""
    dots = x @ codes.t()
    if cosine:
        return dots
    sq = (x_sq.unsqueeze(1) + codes.square().sum(-1).unsqueeze(0) - 2 * dots).clamp_(min=1e-8)
    return sq.sqrt_().neg_()


def gumbel_(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill t with standard Gumbel noise in place: -log(-log(u)), u ~ U(0, 1) clamped as upstream."""
    t.uniform_(0, 1, generator=generator)
    return t.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
