"""The codebook of the vector-quantize-pytorch drop-in: search, EMA, k-means init, dead codes.

State (names, shapes and dtypes as vector_quantize_pytorch's ``Codebook``, so
checkpoints load both ways): ``initted`` () bool, ``cluster_size`` (C, K),
``embed_avg`` (C, K, D), ``embed`` (C, K, D) (a Parameter when learnable), with
C = heads for separate codebooks per head, else 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..functional import nearest_code
from ..kmeans import kmeans, segment_sum_unchecked


def l2norm(t: Tensor) -> Tensor:
    """t (..., D) float divided by its L2 norm along the last dimension (same shape and dtype)."""
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


class Codebook(nn.Module):
    """C codebooks of K codes of size D, updated by EMA of per-code counts and sums.

    forward(flatten (C, M, D) float32) -> (quantize (C, M, D) float32, indices (C, M) int64).
    ``quantize`` carries gradient to ``embed`` when the codebook is learnable.
    """

    def __init__(self, dim: int, codebook_size: int, num_codebooks: int, *, kmeans_init: bool,
                 kmeans_iters: int, decay: float, eps: float, threshold_ema_dead_code: float,
                 use_ddp: bool, learnable_codebook: bool, ema_update: bool, use_cosine_sim: bool,
                 backend: str):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            # Same random calls as vector_quantize_pytorch (kaiming_uniform_ on the
            # (C, K, D) tensor), so a seeded model starts from the same codebook.
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = l2norm(embed)
        self.codebook_size, self.num_codebooks, self.dim = codebook_size, num_codebooks, dim
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code
        self.use_ddp, self.learnable_codebook = use_ddp, learnable_codebook
        self.ema_update, self.use_cosine_sim, self.backend = ema_update, use_cosine_sim, backend
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # Host-side copy of ``initted``: reading the buffer on every forward would
        # synchronize a GPU stream each step (and break torch.compile's graph).
        # Refreshed whenever a state dict is loaded.
        self._initted_host = not kmeans_init

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initted_host = bool(self.initted)

    @property
    def has_dead_code_replacement(self) -> bool:
        """Whether codes under ``threshold_ema_dead_code`` EMA usage get re-seeded."""
        return self.threshold_ema_dead_code > 0

    def transform_input(self, x: Tensor) -> Tensor:
        """x (..., D) float, l2-normalized for the cosine metric, else as it is."""
        return l2norm(x) if self.use_cosine_sim else x

    # ---- search -------------------------------------------------------------

    def forward(self, flatten: Tensor, *, update: bool) -> tuple[Tensor, Tensor]:
        """flatten (C, M, D) float32 -> (quantize (C, M, D) float32, indices (C, M) int64);
        k-means initialization first if pending, the EMA update and re-seeding when ``update``."""
        if not self._initted_host:
            self.init_embed_(flatten)
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        metric = "cosine" if self.use_cosine_sim else "l2"
        search_embed = embed.detach()
        indices = torch.stack([
            nearest_code(flatten[c], search_embed[c], metric=metric, backend=self.backend)[0]
            for c in range(flatten.shape[0])
        ])
        # A row gather, not a one-hot matmul, taken before the EMA step rewrites
        # ``embed`` in place. index_select keeps only the indices for its backward
        # (gather would keep ``embed`` itself, which the in-place update invalidates).
        c, k, d = embed.shape
        offsets = torch.arange(c, device=indices.device).unsqueeze(1) * k
        quantize = embed.reshape(c * k, d).index_select(0, (indices + offsets).reshape(-1)).reshape(c, indices.shape[1], d)
        if update and (self.ema_update or self.has_dead_code_replacement):
            self.update_codebook(flatten, indices)
        return quantize, indices

    # ---- k-means initialization --------------------------------------------

    # Runs eagerly under torch.compile (a graph break): it reads row counts on the
    # host and makes collectives that depend on them.
    @torch.compiler.disable
    @torch.no_grad()
    def init_embed_(self, flatten: Tensor) -> None:
        """k-means initialization of every codebook from flatten (C, M, D) float32
        (rows of every rank with ``use_ddp``); waits while no rank has rows."""
        if self._initted_host:
            return
        # Every rank learns the total row count, so all of them skip or all initialize.
        total = sum(distributed.gather_sizes(flatten.shape[1], flatten.device)) if self.use_ddp else flatten.shape[1]
        if total == 0:
            return
        metric = "cosine" if self.use_cosine_sim else "l2"
        means, counts = [], []
        for c in range(flatten.shape[0]):
            out = kmeans(flatten[c], self.codebook_size, self.kmeans_iters, metric=metric,
                         sync=self.use_ddp, backend=self.backend)
            means.append(out.centroids)
            counts.append(out.counts)
        means, counts = torch.stack(means), torch.stack(counts)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self.cluster_size.copy_(counts)
        self.update_ema()
        self.initted.fill_(True)
        self._initted_host = True

    # ---- EMA ------------------------------------------------------------------

    @torch.no_grad()
    def update_ema(self) -> None:
        """embed = embed_avg / Laplace-smoothed cluster_size (l2-normalized for cosine)."""
        cs = self.cluster_size
        total = cs.sum(dim=-1, keepdim=True)
        smoothed = (cs + self.eps) / (total + self.codebook_size * self.eps) * total
        embed = self.embed_avg / smoothed.unsqueeze(-1)
        if self.use_cosine_sim:
            embed = l2norm(embed)
        self.embed.copy_(embed)

    # Runs eagerly under torch.compile (a graph break, so fullgraph=True refuses EMA
    # training rather than get it wrong): inside one compiled graph, the backward
    # re-gathered the codes from ``embed`` after this in-place update had changed
    # it, and input gradients came out wrong by up to 0.5 (torch 2.13, CPU).
    @torch.compiler.disable
    @torch.no_grad()
    def update_codebook(self, flatten: Tensor, indices: Tensor) -> None:
        """EMA of the per-code counts and sums of flatten (C, M, D) float32 under their
        codes indices (C, M) int64 (all-reduced with ``use_ddp``), then dead-code re-seeding."""
        if not self.ema_update and not self.has_dead_code_replacement:
            return
        stats = [segment_sum_unchecked(indices[c], flatten[c].detach(), self.codebook_size, self.backend)
                 for c in range(flatten.shape[0])]
        counts = torch.stack([s[0] for s in stats])
        sums = torch.stack([s[1] for s in stats])
        if self.use_ddp:
            distributed.all_reduce_(counts, sums)
        weight = 1.0 - self.decay
        self.cluster_size.lerp_(counts.to(self.cluster_size), weight)
        self.embed_avg.lerp_(sums.to(self.embed_avg), weight)
        if self.ema_update:
            self.update_ema()
        if self.training:
            self.expire_codes_(flatten.detach())

    # ---- dead codes -----------------------------------------------------------

    @torch.no_grad()
    def expire_codes_(self, flatten: Tensor) -> None:
        """Re-seed codes whose EMA usage fell under ``threshold_ema_dead_code`` with rows of
        flatten (C, M, D) float32 (drawn from every rank's rows with ``use_ddp``)."""
        if not self.has_dead_code_replacement:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        # cluster_size is identical on every rank, so every rank takes the same branch.
        if not torch.any(expired):
            return
        samples_all = l2norm(flatten) if self.use_cosine_sim else flatten
        for c in range(flatten.shape[0]):
            mask = expired[c]
            samples = samples_all[c]
            if self.use_ddp:
                sampled, mask = self._draw_distributed(samples, mask)
            else:
                sampled, mask = self._draw_local(samples, mask)
            if sampled is None:
                continue
            sampled = sampled.to(self.embed)
            self.embed[c][mask] = sampled
            self.cluster_size[c][mask] = self.reset_cluster_size
            self.embed_avg[c][mask] = sampled * self.reset_cluster_size

    def _draw_local(self, samples: Tensor, mask: Tensor):
        # The random calls of vector_quantize_pytorch's Codebook.replace, in its order.
        num_samples = samples.shape[0]
        if num_samples == 0:
            return None, mask
        num_dead = int(mask.sum().item())
        if num_dead > num_samples:
            dead = mask.nonzero(as_tuple=True)[0]
            dead = dead[torch.randperm(num_dead, device=samples.device)[:num_samples]]
            mask = torch.zeros_like(mask)
            mask[dead] = True
            num_dead = num_samples
        if num_samples >= num_dead:
            picked = torch.randperm(num_samples, device=samples.device)[:num_dead]
        else:
            picked = torch.randint(0, num_samples, (num_dead,), device=samples.device)
        return samples[picked], mask

    def _draw_distributed(self, samples: Tensor, mask: Tensor):
        # Rows come from the union of all ranks (the same draw everywhere); with
        # fewer rows than dead codes, a random subset of the dead codes (the same
        # everywhere) is re-seeded now and the rest at later steps.
        num_dead = int(mask.sum().item())
        if num_dead == 0:
            return None, mask
        sampled = distributed.sample_rows(samples, num_dead)
        m = sampled.shape[0]
        if m == 0:
            return None, mask
        if m < num_dead:
            dead = mask.nonzero(as_tuple=True)[0]
            dead = dead[distributed.random_subset(num_dead, m, samples.device)]
            mask = torch.zeros_like(mask)
            mask[dead] = True
        return sampled, mask
