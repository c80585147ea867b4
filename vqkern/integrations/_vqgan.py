"""The VQ-VAE quantizer step of the VQGAN lineage, shared by the image adapters.

diffusers' ``VectorQuantizer``, taming-transformers' ``VectorQuantizer``/``VectorQuantizer2``
and the VQ-VAE quantizers of transformers' Chameleon, Janus and GLM-Image all do the same
thing once their input is laid out as channel-last rows z (N, D) against an
``nn.Embedding`` codebook E (K, D):

    idx  = argmin_k |z - E_k|^2             (an N x K distance matrix)
    e    = E[idx]
    loss = w_commit * mean((sg[e] - z)^2) + w_codebook * mean((e - sg[z])^2)
    out  = z + sg[e - z]                    (straight-through)

with (w_commit, w_codebook) = (1, beta), or (beta, 1) for diffusers' and taming's
``legacy=False``. Here the search and both loss terms (with their gradients) come from one
``vqkern.quantize`` call; ``out`` is formed with the libraries' own expression, so it is
bitwise theirs for the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..functional import quantize


def channels_last(z, ndim: int, channels: int, *, name: str, layout: str) -> Tensor:
    """Check ``z`` (a float tensor of ``ndim`` dims with ``channels`` at dim 1, or at dim 2
    for 5-d video latents) and return it channel-last and contiguous, as the libraries
    permute it. Raises before any kernel runs, naming the argument."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {z.dtype}")
    axis = 2 if ndim == 5 else 1
    if z.dim() != ndim or z.shape[axis] != channels:
        raise ValueError(f"{name} must have shape {layout} with {channels} channels, got {tuple(z.shape)}")
    order = (0, 1, 3, 4, 2) if ndim == 5 else (0, 2, 3, 1)
    return z.permute(*order).contiguous()


def quantize_rows(z: Tensor, codebook: Tensor, *, commitment_weight: float, codebook_weight: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The quantizer step above on channel-last z (..., D) against codebook (K, D).

    Returns (out like z, in the dtype the libraries' ``z + (e - z)`` gives: z's and the
    codebook's promoted; loss, a scalar in that dtype; indices int64 (N,)). The gradient
    reaches z straight through ``out`` and through ``w_commit`` times the commitment term,
    the codebook only through ``w_codebook`` times the codebook term.
    """
    out = quantize(z.reshape(-1, z.shape[-1]), codebook, beta=0.0, backend=backend)
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    loss = commitment_weight * out.commitment_loss + codebook_weight * out.codebook_loss
    if codebook.dtype == z.dtype:
        # vqkern's quantized is exactly codebook[idx]: no second gather.
        e = out.quantized.detach().view(z.shape)
    else:
        e = codebook.detach()[out.indices].view(z.shape)
    return z + (e - z).detach(), loss.to(dtype), out.indices


def forward_legacy_beta(self, z, channels: int, layout: str, backend: str):
    """The forward of diffusers' ``VectorQuantizer`` and taming's ``VectorQuantizer2`` (the
    same code): z (B, channels, H, W) float -> (z_q like z, loss, (None, None, indices)),
    ``beta`` on the codebook term with ``legacy`` (their default), on the commitment term
    without; indices int64 (B*H*W,), (B*H*W, 1) with ``remap``, (B, H, W) with
    ``sane_index_shape``."""
    z = channels_last(z, 4, channels, name="z", layout=layout)
    weights = (1.0, self.beta) if self.legacy else (self.beta, 1.0)
    z_q, loss, indices = quantize_rows(z, self.embedding.weight, commitment_weight=weights[0],
                                       codebook_weight=weights[1], backend=backend)
    z_q = z_q.permute(0, 3, 1, 2).contiguous()
    if self.remap is not None:
        indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
    if self.sane_index_shape:
        indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
    return z_q, loss, (None, None, indices)


def remap_to_used(self, inds: Tensor) -> Tensor:
    """``remap_to_used`` of diffusers' and taming's quantizers without their (N, len(used))
    match matrix: each index becomes the position of its first occurrence in ``self.used``;
    indices not in it become ``self.unknown_index``, or a draw from ``torch.randint`` (the
    same call as the libraries', so a seeded run draws the same values).

    inds: int64 (B, ...) -> int64 of the same shape.
    """
    ishape = inds.shape
    if len(ishape) < 2:
        raise ValueError(f"inds must have a batch axis and at least one more, got shape {tuple(ishape)}")
    inds = inds.reshape(ishape[0], -1)
    used = self.used.to(inds).reshape(-1)
    if used.numel() == 0:
        known, new = torch.zeros_like(inds, dtype=torch.bool), torch.zeros_like(inds)
    else:
        values, inverse = torch.unique(used, sorted=True, return_inverse=True)
        # The position of each distinct value's first occurrence (match.argmax takes the first).
        first = torch.full((values.numel(),), used.numel(), dtype=torch.int64, device=used.device)
        first.scatter_reduce_(0, inverse, torch.arange(used.numel(), device=used.device), "amin")
        where = torch.searchsorted(values, inds).clamp_(max=values.numel() - 1)
        known = values[where] == inds
        new = torch.where(known, first[where], torch.zeros_like(inds))
    unknown = ~known
    if self.unknown_index == "random":
        new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
    else:
        new[unknown] = self.unknown_index
    return new.reshape(ishape)
