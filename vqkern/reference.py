"""Plain PyTorch vector quantization (VQ-VAE, van den Oord et al. 2017).

Written for clarity, never for speed: it materializes the N x K distance matrix
(and an N x K one-hot for the EMA statistics). It is the ground truth of the
tests and benchmarks, the ``reference`` backend, and the reference quantizer of
the training script. It shares no code with the fused path on purpose, so that
a bug in vqkern's module logic cannot hide in the thing it is checked against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceOutput(NamedTuple):
    """Outputs of :func:`quantize`: quantized (z's shape and dtype), indices (int64,
    z's leading shape), loss, commitment_loss, codebook_loss (float32 scalars)."""
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


class ReferenceVQOutput(NamedTuple):
    """Outputs of :class:`ReferenceVectorQuantizer`: quantized (z's shape and dtype), indices
    (int64, z's shape without the channel dimension), loss and perplexity (float32 scalars).

    The same fields as ``vqkern.VQOutput``, defined here so that the oracle imports
    nothing from the module it checks."""
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor


def distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, K) in float64, by broadcasting the residual z_i - e_k.

    float64 and the residual form make the argmin the true nearest code, with
    identical codes giving identical distances (so ties go to the lowest index).
    Rows are taken a chunk at a time only to bound the (chunk, K, D) temporary.
    """
    z64, e64 = z.double(), codebook.double()
    rows = max(1, (64 * 2**20) // (8 * max(1, e64.numel())))
    chunks = [((z64[i:i + rows, None, :] - e64[None]) ** 2).sum(-1) for i in range(0, z64.shape[0], rows)]
    return torch.cat(chunks) if chunks else z64.new_zeros((0, e64.shape[0]))


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (N,) int64 of the nearest code for each row of z (N, D); first index wins ties.

    A NaN distance (a code or row holding a NaN, or inf - inf) never wins: torch.argmin
    would return it as the minimum."""
    return distances(z, codebook).nan_to_num_(nan=float("inf")).argmin(dim=1)


def quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25) -> ReferenceOutput:
    """VQ of z (..., D) against codebook (K, D) with the straight-through estimator.

    codebook_loss = mean((sg[z] - e)^2), commitment_loss = mean((z - sg[e])^2),
    loss = codebook_loss + beta * commitment_loss, all float32 means over the
    N*D elements (0 when z is empty). quantized has z's shape and dtype.
    """
    flat = z.reshape(-1, codebook.shape[1])
    idx = nearest_code(flat.detach(), codebook.detach())
    e = codebook[idx]
    if flat.shape[0] == 0:
        zero = (flat.float().sum() + e.float().sum()) * 0.0
        codebook_loss, commitment_loss = zero, zero
    else:
        codebook_loss = ((flat.detach().float() - e.float()) ** 2).mean()
        commitment_loss = ((flat.float() - e.detach().float()) ** 2).mean()
    # Straight-through: forward value is exactly e (z - sg[z] is exactly 0), the
    # gradient is the identity to z. The textbook z + sg[e - z] rounds in z's dtype.
    quantized = e.detach().to(z.dtype) + (flat - flat.detach())
    return ReferenceOutput(
        quantized.reshape(z.shape),
        idx.reshape(z.shape[:-1]),
        codebook_loss + beta * commitment_loss,
        commitment_loss,
        codebook_loss,
    )


@torch.no_grad()
def ema_update(codebook, cluster_size, embed_avg, z, indices, decay, eps) -> None:
    """EMA codebook update in place, with Laplace-smoothed cluster sizes.

    z (N, D) float rows and their codes ``indices`` (N,) int64; cluster_size (K,)
    and embed_avg (K, D) (float32) decay towards this batch's per-code counts and
    sums; codebook (K, D) becomes embed_avg / smoothed cluster size.
    """
    k = codebook.shape[0]
    one_hot = F.one_hot(indices, k).float()
    cluster_size.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
    embed_avg.mul_(decay).add_(one_hot.t() @ z.float(), alpha=1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    codebook.copy_(embed_avg / smoothed.unsqueeze(1))


def perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the histogram of indices (any shape, int64) over num_codes codes, as a
    float32 scalar: K when all codes are used evenly, 1 at collapse."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-torch.special.xlogy(p, p).sum()).float()


class ReferenceVectorQuantizer(nn.Module):
    """Plain PyTorch twin of ``vqkern.VectorQuantizer`` (same arguments but ``backend``).

    forward(z) takes (..., D), or channel-first maps with channel_dim=1, and returns
    (quantized, indices, loss, perplexity).
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, *, ema=False,
                 decay=0.99, eps=1e-5, metric="l2", dead_code_threshold=0.0, channel_dim=-1):
        super().__init__()
        if metric != "l2":
            raise NotImplementedError("the reference quantizer implements metric='l2' only")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.ema, self.decay, self.eps = commitment_cost, ema, decay, eps
        self.dead_code_threshold, self.channel_dim = dead_code_threshold, channel_dim
        if ema:
            self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim))
            self.register_buffer("embed_avg", self.codebook.clone())
        else:
            bound = 1.0 / num_embeddings
            self.codebook = nn.Parameter(torch.empty(num_embeddings, embedding_dim).uniform_(-bound, bound))
        self.register_buffer("cluster_size", torch.ones(num_embeddings))

    def forward(self, z):
        """z: float, D at ``channel_dim``. Returns ReferenceVQOutput(quantized like z, indices
        int64 of z's shape without the channel dimension, loss and perplexity fp32 scalars)."""
        moved = z.movedim(self.channel_dim, -1) if self.channel_dim != -1 else z
        out = quantize(moved, self.codebook, self.commitment_cost)
        loss = self.commitment_cost * out.commitment_loss if self.ema else out.loss
        flat_idx = out.indices.reshape(-1)
        if self.training:
            flat = moved.detach().reshape(-1, self.embedding_dim)
            if self.ema:
                ema_update(self.codebook, self.cluster_size, self.embed_avg, flat, flat_idx,
                           self.decay, self.eps)
            else:
                with torch.no_grad():
                    counts = torch.bincount(flat_idx, minlength=self.num_embeddings).float()
                    self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            if self.dead_code_threshold > 0 and flat.shape[0] > 0:
                with torch.no_grad():
                    dead = self.cluster_size < self.dead_code_threshold
                    rows = flat[torch.randint(flat.shape[0], (self.num_embeddings,), device=flat.device)]
                    self.codebook.copy_(torch.where(dead[:, None], rows.to(self.codebook.dtype), self.codebook))
                    self.cluster_size.copy_(torch.where(dead, self.dead_code_threshold, self.cluster_size))
                    if self.ema:
                        self.embed_avg.copy_(torch.where(dead[:, None], self.codebook * self.dead_code_threshold,
                                                         self.embed_avg))
        quantized = out.quantized.movedim(-1, self.channel_dim) if self.channel_dim != -1 else out.quantized
        return ReferenceVQOutput(quantized, out.indices, loss, perplexity(flat_idx, self.num_embeddings))
