"""nn.Module layers built on the functional API."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _library, backends, distributed
from .functional import METRICS, check_finite, check_inputs, quantize


class VQOutput(NamedTuple):
    """quantized: z's shape and dtype; indices: int64; loss, perplexity: fp32 scalars."""
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram (K,) (any real dtype), as a float32 scalar: K when
    codes are used evenly, 1 at collapse."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer layer over vqkern's fused kernels.

    Args:
        num_embeddings: K, the number of codes.
        embedding_dim: D, the size of each code vector.
        commitment_cost: beta, the weight of the commitment loss.
        ema: update the codebook by exponential moving averages of the per-code
            counts and sums (buffers ``cluster_size`` (K,), ``embed_avg`` (K, D))
            instead of by gradient; the loss is then beta * commitment_loss.
        decay, eps: EMA decay and Laplace smoothing of the cluster sizes.
        metric: "l2" or "cosine".
        dead_code_threshold: in training, codes whose EMA usage (``cluster_size``)
            falls under this value are re-seeded with random rows of the batch.
        channel_dim: the dimension of z holding D (1 for (B, D, H, W) feature maps).
        backend: "auto", "triton", "cuda", "torch" or "reference".

    forward(z) takes z with D at ``channel_dim`` and returns
    VQOutput(quantized, indices, loss, perplexity): quantized like z, indices
    int64 with z's shape minus the channel dimension, perplexity = exp of the
    entropy of this batch's code histogram (the codebook-collapse monitor).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, *,
                 ema: bool = False, decay: float = 0.99, eps: float = 1e-5, metric: str = "l2",
                 dead_code_threshold: float = 0.0, channel_dim: int = -1, backend: str = "auto"):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.commitment_cost = check_finite("commitment_cost", commitment_cost)
        self.decay = check_finite("decay", decay)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.eps = check_finite("eps", eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.dead_code_threshold = check_finite("dead_code_threshold", dead_code_threshold)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.ema, self.metric, self.channel_dim, self.backend = bool(ema), metric, channel_dim, backend
        if self.ema:
            self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim))
            self.register_buffer("embed_avg", self.codebook.clone())
        else:
            bound = 1.0 / num_embeddings
            self.codebook = nn.Parameter(torch.empty(num_embeddings, embedding_dim).uniform_(-bound, bound))
        # Every code starts as if seen once: an EMA step then cannot divide a code's
        # running sum by a near-zero smoothed count (the usual blow-up of unused codes).
        self.register_buffer("cluster_size", torch.ones(num_embeddings))

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, ema={self.ema}, decay={self.decay}, "
                f"eps={self.eps}, metric={self.metric!r}, dead_code_threshold={self.dead_code_threshold}, "
                f"channel_dim={self.channel_dim}, backend={self.backend!r}")

    def codebook_usage(self) -> Tensor:
        """The EMA code histogram (K,) float32: decayed count of rows assigned to each code."""
        return self.cluster_size.detach().clone()

    def _channel_last(self, z: Tensor) -> Tensor:
        if self.channel_dim == -1:
            return z
        if not -z.dim() <= self.channel_dim < z.dim():
            raise ValueError(f"channel_dim={self.channel_dim} is out of range for z with {z.dim()} dimensions")
        return z.movedim(self.channel_dim, -1)

    def forward(self, z: Tensor) -> VQOutput:
        """Quantize z (float32/float16/bfloat16, D at ``channel_dim``, any number of rows).

        Returns VQOutput(quantized: z's shape and dtype; indices: int64, z's shape without
        the channel dimension; loss: fp32 scalar, codebook_loss + commitment_cost *
        commitment_loss, or commitment_cost * commitment_loss with ``ema``; perplexity:
        fp32 scalar of this batch). In training mode it also updates the EMA statistics
        and re-seeds dead codes (not when z holds a NaN or an infinity).
        """
        moved = self._channel_last(z)
        check_inputs(moved, self.codebook, self.metric)
        codebook = self.codebook
        if self.training and (self.ema or self.dead_code_threshold > 0):
            # The op saves the codebook for its backward, and the update below rewrites
            # it in place: the backward would fail on the bumped version (and needs
            # the codes the search chose anyway). A (K, D) copy per training step.
            # index_select, not clone: under torch.compile the min-cut partitioner
            # recomputes a clone in the backward from the buffer the forward mutated
            # (torch 2.13; pytorch/pytorch#197039), which gave the encoder gradients
            # 5% off; index_select is outside its recompute allowlist, so it is saved.
            codebook = codebook.index_select(0, torch.arange(codebook.shape[0], device=codebook.device))
        out = quantize(moved, codebook, beta=self.commitment_cost, metric=self.metric, backend=self.backend)
        loss = self.commitment_cost * out.commitment_loss if self.ema else out.loss
        flat_idx = out.indices.reshape(-1)
        if self.training:
            counts = self._update(moved.detach().reshape(-1, self.embedding_dim), flat_idx)
        else:
            counts = torch.bincount(flat_idx, minlength=self.num_embeddings)
        quantized = out.quantized.movedim(-1, self.channel_dim) if self.channel_dim != -1 else out.quantized
        return VQOutput(quantized, out.indices, loss, perplexity_from_counts(counts))

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor) -> Tensor:
        """EMA statistics, codebook update and dead-code re-seeding; returns this batch's counts."""
        k = self.num_embeddings
        name = backends.resolve(self.backend, flat.device)
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.ema:
            counts, sums = _library.segment_sum(indices, flat.contiguous(), k, name, deterministic)
        else:
            counts = torch.bincount(indices, minlength=k).float()
        local_counts = counts.clone()
        # A non-finite batch (NaN in z) leaves every buffer as it was: its loss is
        # already NaN, and a poisoned codebook could not recover. Under DDP a NaN on
        # one rank reaches every rank's sums through the all-reduce, so the flag is
        # all-reduced with them and every rank skips the same step.
        nonfinite = (~torch.isfinite(flat).all()).float()
        if self.ema:
            distributed.all_reduce_(counts, sums, nonfinite)
        else:
            distributed.all_reduce_(counts, nonfinite)
        finite = nonfinite == 0
        decay = self.decay
        new_size = self.cluster_size * decay + counts * (1 - decay)
        self.cluster_size.copy_(torch.where(finite, new_size, self.cluster_size))
        if self.ema:
            new_avg = self.embed_avg * decay + sums * (1 - decay)
            self.embed_avg.copy_(torch.where(finite, new_avg, self.embed_avg))
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
            # Guarded too: after a re-seeding the codebook is not embed_avg / smoothed size.
            new_codebook = (self.embed_avg / smoothed.unsqueeze(1)).to(self.codebook.dtype)
            self.codebook.copy_(torch.where(finite, new_codebook, self.codebook))
        if self.dead_code_threshold > 0:
            rows = self._reseed_rows(flat)
            if rows is not None:
                self._reseed(rows, finite)
        return local_counts

    def _reseed_rows(self, flat: Tensor) -> Tensor | None:
        """K candidate rows (K, D) for re-seeding, or None when there is no row to draw from."""
        k = self.num_embeddings
        if distributed.is_distributed():
            # Drawn from the union of every rank's rows, the same on every rank; every
            # rank takes this branch, with any number of rows, so none waits alone in
            # a collective when some ranks have no rows.
            rows = distributed.sample_rows(flat, k, allow_duplicates=True)
            return rows if rows.shape[0] > 0 else None
        if flat.shape[0] == 0:
            return None
        return flat[torch.randint(flat.shape[0], (k,), device=flat.device)]

    def _reseed(self, rows: Tensor, finite: Tensor) -> None:
        dead = (self.cluster_size < self.dead_code_threshold) & finite
        seeded = torch.where(dead.unsqueeze(1), rows.to(self.codebook.dtype), self.codebook)
        self.codebook.copy_(seeded)
        self.cluster_size.copy_(torch.where(dead, self.dead_code_threshold, self.cluster_size))
        if self.ema:
            self.embed_avg.copy_(torch.where(dead.unsqueeze(1), seeded.float() * self.dead_code_threshold,
                                             self.embed_avg))
