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
from . import sampling


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
                 backend: str, manual_ema_update: bool = False, sync_kmeans: bool = True):
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
        self.manual_ema_update = manual_ema_update
        # As vector_quantize_pytorch: without sync_kmeans, k-means and the dead-code
        # draws use each rank's own rows (the EMA statistics are still all-reduced).
        self.sync_kmeans = use_ddp and sync_kmeans
        # Statistics gathered by ``accum_ema_update`` steps, added to the next EMA step's.
        self._accumulated = None
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

    def forward(self, flatten: Tensor, *, update: bool, mask: Tensor | None = None, sample_temp: float = 0.0,
                ema_update: bool | None = None, ema_update_weight=None, accum_ema_update: bool = False,
                topk: int | None = None, transform=None) -> tuple[Tensor, Tensor]:
        """Search (or sample) the code of every row, then update the codebook.

        Args:
            flatten: (C, M, D) float32 rows, one set per codebook.
            update: run the EMA update and dead-code re-seeding (training, codebook not frozen).
            mask: optional (C, M) bool; False rows (padding) take no part in k-means
                initialization, the EMA statistics or dead-code re-seeding.
            sample_temp: > 0 draws each row's code from softmax(-distance / sample_temp)
                (Gumbel-max, see :mod:`vqkern.compat.sampling`) instead of the nearest code.
            ema_update, ema_update_weight, accum_ema_update: see :meth:`update_codebook`.
            topk: the k best codes of each row (quantize (C, M, k, D), indices (C, M, k));
                no codebook update then, as vector_quantize_pytorch.
            transform: optional callable embed (C, K, D) -> (C, B, N, K, D) codes made per row
                (ResidualVQ's implicit neural codebook, M = B * N); this materializes the
                (M, K, D) tensor it returns, as the option defines it.
        Returns:
            (quantize (C, M, D) float32, indices (C, M) int64); ``quantize`` carries gradient
            to ``embed`` when the codebook is learnable.
        """
        if not self._initted_host:
            self.init_embed_(flatten, mask)
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        metric = "cosine" if self.use_cosine_sim else "l2"
        search_embed = embed.detach()
        searched = flatten.detach()
        if mask is not None:
            # Padding takes no part in the search either: the fp32 searches rank in a frame
            # centred on the median of the rows (vqkern.backends._frame), which padding rows
            # far out (half the rows or more) would move off the data. They are searched at
            # the real rows' mean instead; their codes are dropped afterwards.
            keep = mask.unsqueeze(-1)
            mean = (torch.where(keep, searched, 0.0).sum(dim=1, keepdim=True)
                    / keep.sum(dim=1, keepdim=True).clamp_min(1))
            searched = torch.where(keep, searched, mean)
        if transform is not None:
            quantize, indices = self._search_transformed(searched, transform(embed))
            effective = self.ema_update if ema_update is None else ema_update
            if update and (effective or self.has_dead_code_replacement):
                self.update_codebook(flatten, indices, mask=mask, ema_update=ema_update,
                                     ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update)
            return quantize, indices
        if topk is not None and (topk > 1 or sample_temp > 0):
            indices = torch.stack([
                sampling.topk_codes(searched[c], search_embed[c], topk, cosine=self.use_cosine_sim,
                                    temperature=sample_temp) for c in range(flatten.shape[0])])
            c, m, k = indices.shape
            return self.gather(embed, indices.reshape(c, m * k)).reshape(c, m, k, -1), indices
        if sample_temp > 0:
            indices = torch.stack([
                sampling.gumbel_sample_codes(searched[c], search_embed[c], sample_temp,
                                             cosine=self.use_cosine_sim, backend=self.backend)
                for c in range(flatten.shape[0])])
        else:
            indices = torch.stack([
                nearest_code(searched[c], search_embed[c], metric=metric, backend=self.backend)[0]
                for c in range(flatten.shape[0])
            ])
        quantize = self.gather(embed, indices)
        if topk is not None:  # k = 1: the fused search
            return quantize.unsqueeze(2), indices.unsqueeze(2)
        ema_update = self.ema_update if ema_update is None else ema_update
        if update and (ema_update or self.has_dead_code_replacement):
            self.update_codebook(flatten, indices, mask=mask, ema_update=ema_update,
                                 ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update)
        return quantize, indices

    def _search_transformed(self, flatten: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """flatten (C, M, D) against per-row codes (C, B, N, K, D) with B * N = M ->
        (quantize (C, M, D), indices (C, M) int64), with vector_quantize_pytorch's distances."""
        c, m, d = flatten.shape
        codes = codes.reshape(c, m, codes.shape[-2], d)
        if self.use_cosine_sim:
            codes = l2norm(codes)
            logits = torch.einsum("cmd,cmkd->cmk", flatten, codes)
        else:
            logits = -F.pairwise_distance(flatten.unsqueeze(2), codes)
        indices = logits.detach().argmax(dim=-1)
        quantize = codes.gather(2, indices[..., None, None].expand(c, m, 1, d)).squeeze(2)
        return quantize, indices

    @staticmethod
    def gather(embed: Tensor, indices: Tensor) -> Tensor:
        """Rows of embed (C, K, D) at indices (C, M) int64 in [0, K) -> (C, M, D)."""
        # A row gather, not a one-hot matmul, taken before the EMA step rewrites
        # ``embed`` in place. index_select keeps only the indices for its backward
        # (gather would keep ``embed`` itself, which the in-place update invalidates).
        c, k, d = embed.shape
        offsets = torch.arange(c, device=indices.device).unsqueeze(1) * k
        return embed.reshape(c * k, d).index_select(0, (indices + offsets).reshape(-1)).reshape(c, indices.shape[1], d)

    # ---- k-means initialization --------------------------------------------

    # Runs eagerly under torch.compile (a graph break): it reads row counts on the
    # host and makes collectives that depend on them.
    @torch.compiler.disable
    @torch.no_grad()
    def init_embed_(self, flatten: Tensor, mask: Tensor | None = None) -> None:
        """k-means initialization of every codebook from flatten (C, M, D) float32, only
        its rows where mask (C, M) bool is True (rows of every rank with ``use_ddp``);
        waits while no rank has rows."""
        if self._initted_host:
            return
        if mask is not None:
            # The mask is the same for every codebook (the padding of the input).
            flatten = flatten[:, mask[0]]
        # Every rank learns the total row count, so all of them skip or all initialize.
        total = flatten.shape[1]
        if self.sync_kmeans:
            total = sum(distributed.gather_sizes(total, flatten.device))
        if total == 0:
            return
        metric = "cosine" if self.use_cosine_sim else "l2"
        means, counts = [], []
        for c in range(flatten.shape[0]):
            out = kmeans(flatten[c], self.codebook_size, self.kmeans_iters, metric=metric,
                         sync=self.sync_kmeans, backend=self.backend)
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
    def update_codebook(self, flatten: Tensor, indices: Tensor, *, mask: Tensor | None = None,
                        ema_update: bool | None = None, ema_update_weight=None,
                        accum_ema_update: bool = False) -> None:
        """EMA of the per-code counts and sums of flatten (C, M, D) float32 under their
        codes indices (C, M) int64 (all-reduced with ``use_ddp``), then dead-code re-seeding.

        Args:
            mask: optional (C, M) bool; rows where it is False are left out.
            ema_update: recompute ``embed`` from the statistics (default: the constructor's);
                the statistics are tracked either way when dead codes are re-seeded.
            ema_update_weight: optional per-code weight of this step's EMA move, a (K,) or
                (C, K) float tensor, or a callable ``(sums (C, K, D), counts (C, K)) -> weight``;
                a code of weight 0 keeps its statistics.
            accum_ema_update: only accumulate the statistics; the next update without it
                adds them to its own batch's before the EMA step.
        """
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        flatten = flatten.detach()
        keep = None if mask is None else mask
        stats = []
        for c in range(flatten.shape[0]):
            idx, rows = indices[c], flatten[c]
            if keep is not None:
                idx, rows = idx[keep[c]], rows[keep[c]]
            stats.append(segment_sum_unchecked(idx, rows, self.codebook_size, self.backend))
        counts = torch.stack([s[0] for s in stats])
        sums = torch.stack([s[1] for s in stats])
        if self.use_ddp:
            distributed.all_reduce_(counts, sums)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(sums, counts)
        weight = self._check_ema_weight(ema_update_weight)
        if accum_ema_update:
            self._accumulated = (counts, sums) if self._accumulated is None else (
                self._accumulated[0] + counts, self._accumulated[1] + sums)
            return
        if self._accumulated is not None:
            counts, sums = counts + self._accumulated[0], sums + self._accumulated[1]
            self._accumulated = None
        step = 1.0 - self.decay
        if weight is not None:
            step = step * weight.to(self.cluster_size)
            self.cluster_size.lerp_(counts.to(self.cluster_size), step)
            self.embed_avg.lerp_(sums.to(self.embed_avg), step.unsqueeze(-1))
        else:
            self.cluster_size.lerp_(counts.to(self.cluster_size), step)
            self.embed_avg.lerp_(sums.to(self.embed_avg), step)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        if self.training:
            self.expire_codes_(flatten, mask)

    def _check_ema_weight(self, weight):
        if weight is None:
            return None
        if not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32, device=self.cluster_size.device)
        if weight.dim() == 0:
            return weight.expand(self.cluster_size.shape)
        if weight.dim() == 1:
            weight = weight.unsqueeze(0)
        if weight.dim() != 2 or weight.shape[1] != self.codebook_size or weight.shape[0] not in (1, self.num_codebooks):
            raise ValueError(f"ema_update_weight must have shape (K,) or (C, K) = "
                             f"{(self.num_codebooks, self.codebook_size)}, got {tuple(weight.shape)}")
        if weight.shape[0] != self.num_codebooks:
            raise ValueError(f"ema_update_weight must have shape (C, K) = {(self.num_codebooks, self.codebook_size)} "
                             f"with {self.num_codebooks} codebooks, got {tuple(weight.shape)}")
        return weight

    @torch.no_grad()
    def update_indices(self, flatten: Tensor, indices: Tensor, *, mask: Tensor | None = None,
                       ema_update_weight=None, accum_ema_update: bool = False,
                       ema_update: bool | None = None) -> None:
        """The EMA update for codes chosen elsewhere: flatten (C, M, D) float, indices (C, M)
        int64 in [0, K) or -1 (a row without a code, left out like a masked row), mask (C, M) bool."""
        flatten = flatten.float()
        if indices.shape != flatten.shape[:2]:
            raise ValueError(f"indices must have shape {tuple(flatten.shape[:2])}, got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}) or be -1")
        valid = indices >= 0
        mask = valid if mask is None else (mask & valid)
        self.update_codebook(flatten, indices.clamp(min=0), mask=mask, ema_update=ema_update,
                             ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update)

    update_ema_indices = update_indices

    # ---- dead codes -----------------------------------------------------------

    @torch.no_grad()
    def expire_codes_(self, flatten: Tensor, mask: Tensor | None = None) -> None:
        """Re-seed codes whose EMA usage fell under ``threshold_ema_dead_code`` with rows of
        flatten (C, M, D) float32 where mask (C, M) bool is True (drawn from every
        rank's rows with ``use_ddp``)."""
        if not self.has_dead_code_replacement or not self.training:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        # cluster_size is identical on every rank, so every rank takes the same branch.
        if not torch.any(expired):
            return
        samples_all = l2norm(flatten) if self.use_cosine_sim else flatten
        row_mask = mask
        for c in range(flatten.shape[0]):
            mask = expired[c]
            samples = samples_all[c] if row_mask is None else samples_all[c][row_mask[c]]
            if self.sync_kmeans:
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
