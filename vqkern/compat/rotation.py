"""The rotation trick (Fifty et al. 2024, https://arxiv.org/abs/2410.06424, section 4.2).

The forward value is the quantized vector; the gradient reaches the encoder
output through a rotation + rescaling that maps it onto its code, so the angle
and norm between them shape the encoder's gradient (the straight-through
estimator passes it unchanged). Same arithmetic as vector_quantize_pytorch's
``rotate_to``, written with row-wise dot products instead of batched 1 x D
matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _safe_div(num: Tensor, den: Tensor, eps: float = 1e-6) -> Tensor:
    return num / den.clamp(min=eps)


def rotate_to(src: Tensor, tgt: Tensor) -> Tensor:
    """Rotate-and-scale ``src`` onto ``tgt`` with gradient only to ``src``.

    Args:
        src: (..., D) float encoder output (gets the gradient).
        tgt: (..., D) quantized vectors, same shape and dtype (receive no gradient here).
    Returns:
        (..., D) in src's dtype, equal to ``tgt`` up to rounding; d out / d src = s (I - 2 w w^T + 2 q u^T)
        per row, with u = src/|src|, q = tgt/|tgt|, w = (u + q)/|u + q|, s = |tgt|/|src|.
    """
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = _safe_div(src, norm_src).detach()
    q = _safe_div(tgt, norm_tgt).detach()
    w = F.normalize(u + q, p=2, dim=-1, eps=1e-6).detach()
    e = src
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * q
    return rotated * _safe_div(norm_tgt, norm_src).detach()


def directional_reparam(src: Tensor, tgt: Tensor, noise_variance: float = 5e-3) -> Tensor:
    """DiVeQ's directional reparameterization (https://openreview.net/forum?id=KRVnpTbx7R, figure 1).

    ``src + u * |tgt - src|`` with u the unit direction of ``tgt - src`` perturbed by
    Gaussian noise of variance ``noise_variance`` (drawn from the global generator) and
    detached: the value is close to ``tgt``, and the gradient reaches ``src`` and,
    through the distance, ``tgt`` (a learnable codebook). src, tgt: (..., D) float.
    """
    error = tgt - src
    norm = error.norm(dim=-1, keepdim=True)
    noised = error + noise_variance ** 0.5 * torch.randn_like(error)
    return src + F.normalize(noised, p=2, dim=-1, eps=1e-6).detach() * norm
