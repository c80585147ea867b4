"""nn.Module layers built on the functional API."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _library, backends, distributed
from .functional import METRICS, check_finite, check_inputs, quantize
from .kmeans import kmeans


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


INITS = ("random", "kmeans")


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer layer over vqkern's fused kernels.

    Args:
        num_embeddings: K, the number of codes.
        embedding_dim: D, the size of z's vectors (and of each code when
            ``codebook_dim`` is None).
        commitment_cost: beta, the weight of the commitment loss.
        ema: update the codebook by exponential moving averages of the per-code
            counts and sums (buffers ``cluster_size`` (K,), ``embed_avg`` (K, D))
            instead of by gradient; the loss is then beta * commitment_loss.
        decay, eps: EMA decay and Laplace smoothing of the cluster sizes.
        metric: "l2" or "cosine" (z and the codes l2-normalized before the search;
            ``quantized`` is then the normalized code).
        dead_code_threshold: in training, codes whose EMA usage (``cluster_size``)
            falls under this value are re-seeded with random rows of the batch.
        channel_dim: the dimension of z holding D (1 for (B, D, H, W) feature maps).
        backend: "auto", "triton", "cuda", "torch" or "reference".
        init: "random" (the default: uniform in [-1/K, 1/K] for a loss-trained
            codebook, standard normal with ``ema``) or "kmeans": at the
            ``kmeans_batches``-th training batch, before its search, the codebook
            becomes the ``kmeans_iters``-step :func:`vqkern.kmeans` centroids of
            the rows of the first ``kmeans_batches`` training batches (in the
            search space: projected and normalized as the search sees them).
            Inside a torch.distributed process group the rows of every rank are
            clustered as one set (seeds drawn from the union, statistics
            all-reduced), so every rank gets the same codebook. The buffer
            ``initted`` () bool records that it ran, so a model loaded from a
            checkpoint never initializes again; rows gathered before the last
            k-means batch are not checkpointed.
        kmeans_iters, kmeans_batches: Lloyd steps, and training batches gathered (>= 1).
        simvq: a reparameterized codebook as in SimVQ (Zhu et al. 2024):
            ``codebook = basis @ codebook_map.weight.T`` with ``basis`` a frozen
            (K, C) buffer drawn from N(0, 1/C) and ``codebook_map`` a learnable
            C x C linear map. The codebook loss trains the map, so every code moves
            at every step, used or not. Trained by gradient: not with ``ema`` or
            ``dead_code_threshold``. k-means init sets the basis to the centroids
            and the map to the identity.
        codebook_dim: C, an optional search space of another size: z (D) goes
            through ``project_in`` (a learnable D -> C linear layer), is quantized
            there against (K, C) codes, and the code comes back through
            ``project_out`` (C -> D), as in ViT-VQGAN's factorized codes and
            LlamaGen's tokenizer (C = 8 with metric="cosine", an l2-normalized
            low-dimensional search). Losses and statistics live in that space.
            The projections run in their weights' dtype (float32 by default).

    forward(z) takes z with D at ``channel_dim`` and returns
    VQOutput(quantized, indices, loss, perplexity): quantized like z, indices
    int64 with z's shape minus the channel dimension, perplexity = exp of the
    entropy of this batch's code histogram (the codebook-collapse monitor).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, *,
                 ema: bool = False, decay: float = 0.99, eps: float = 1e-5, metric: str = "l2",
                 dead_code_threshold: float = 0.0, channel_dim: int = -1, backend: str = "auto",
                 init: str = "random", kmeans_iters: int = 10, kmeans_batches: int = 1, simvq: bool = False,
                 codebook_dim: int | None = None):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim),
                            ("kmeans_iters", kmeans_iters), ("kmeans_batches", kmeans_batches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or isinstance(codebook_dim, bool)
                                         or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
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
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if simvq and ema:
            raise ValueError("simvq=True trains the codebook's linear map by gradient: it cannot be used with ema=True")
        if simvq and self.dead_code_threshold > 0:
            raise ValueError("simvq=True keeps every code moving by its linear map: dead_code_threshold must be 0")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.ema, self.metric, self.channel_dim, self.backend = bool(ema), metric, channel_dim, backend
        self.init, self.kmeans_iters, self.kmeans_batches = init, kmeans_iters, kmeans_batches
        self.simvq, self.codebook_dim = bool(simvq), codebook_dim
        c = embedding_dim if codebook_dim is None else codebook_dim
        if self.simvq:
            self.register_buffer("basis", torch.randn(num_embeddings, c) * c ** -0.5)
            self.codebook_map = nn.Linear(c, c, bias=False)
        elif self.ema:
            self.register_buffer("codebook", torch.randn(num_embeddings, c))
            self.register_buffer("embed_avg", self.codebook.clone())
        else:
            bound = 1.0 / num_embeddings
            self.codebook = nn.Parameter(torch.empty(num_embeddings, c).uniform_(-bound, bound))
        # Every code starts as if seen once: an EMA step then cannot divide a code's
        # running sum by a near-zero smoothed count (the usual blow-up of unused codes).
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        if codebook_dim is not None:
            self.project_in = nn.Linear(embedding_dim, c)
            self.project_out = nn.Linear(c, embedding_dim)
        if init == "kmeans":
            self.register_buffer("initted", torch.tensor(False))
        # Host-side copy of ``initted``: reading the buffer every step would sync a GPU
        # stream and break torch.compile's graph; refreshed when a state dict is loaded.
        self._initted_host = init != "kmeans"
        self._kmeans_rows: list[Tensor] = []

    @property
    def codebook(self) -> Tensor:
        """The (K, C) codes (C = codebook_dim or D), float32: a Parameter (loss-trained), a
        buffer (``ema``), or with ``simvq`` the product ``basis @ codebook_map.weight.T``,
        computed afresh at each access (forward computes it once per call)."""
        if "codebook" in self._parameters:
            return self._parameters["codebook"]
        if "codebook" in self._buffers:
            return self._buffers["codebook"]
        if self.__dict__.get("simvq"):
            return self._modules["codebook_map"](self._buffers["basis"])
        raise AttributeError("codebook")

    def extra_repr(self) -> str:
        text = (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, ema={self.ema}, decay={self.decay}, "
                f"eps={self.eps}, metric={self.metric!r}, dead_code_threshold={self.dead_code_threshold}, "
                f"channel_dim={self.channel_dim}, backend={self.backend!r}")
        if self.init != "random":
            text += f", init={self.init!r}, kmeans_iters={self.kmeans_iters}, kmeans_batches={self.kmeans_batches}"
        if self.simvq:
            text += ", simvq=True"
        if self.codebook_dim is not None:
            text += f", codebook_dim={self.codebook_dim}"
        return text

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.init == "kmeans":
            self._initted_host = bool(self.initted)
            self._kmeans_rows = []

    def codebook_usage(self) -> Tensor:
        """The EMA code histogram (K,) float32: decayed count of rows assigned to each code."""
        return self.cluster_size.detach().clone()

    def dequantize(self, indices: Tensor) -> Tensor:
        """Code indices (...) int64 -> the vectors (..., D) float32 that forward outputs for
        them (channel last): the codes, normalized for metric="cosine", through
        ``project_out`` with ``codebook_dim``."""
        codes = self.codebook[indices]
        if self.metric == "cosine":
            codes = F.normalize(codes.float(), dim=-1)
        return self.project_out(codes) if self.codebook_dim is not None else codes

    def _channel_last(self, z: Tensor) -> Tensor:
        if self.channel_dim == -1:
            return z
        if not -z.dim() <= self.channel_dim < z.dim():
            raise ValueError(f"channel_dim={self.channel_dim} is out of range for z with {z.dim()} dimensions")
        if z.shape[self.channel_dim] != self.embedding_dim:
            # Checked here, not after the move: the search's check would name "z's last
            # dimension", which the user never set.
            raise ValueError(f"z's channel dimension (channel_dim={self.channel_dim}) has size "
                             f"{z.shape[self.channel_dim]}, but it must equal embedding_dim ({self.embedding_dim}); "
                             f"z has shape {tuple(z.shape)}")
        return z.movedim(self.channel_dim, -1)

    def _project_in(self, moved: Tensor) -> Tensor:
        if self.codebook_dim is None:
            return moved
        if not isinstance(moved, Tensor) or not moved.is_floating_point():
            raise TypeError(f"z must have a floating dtype (float32, float16, bfloat16), got "
                            f"{getattr(moved, 'dtype', type(moved).__name__)}")
        if moved.dim() < 1 or moved.shape[-1] != self.embedding_dim:
            raise ValueError(f"z's last dimension ({moved.shape[-1] if moved.dim() else 'none'}) must equal "
                             f"embedding_dim ({self.embedding_dim})")
        if moved.device != self.project_in.weight.device:
            raise ValueError(f"z and the layer must be on the same device, got z on {moved.device} and the "
                             f"layer on {self.project_in.weight.device}")
        return self.project_in(moved.to(self.project_in.weight.dtype))

    def _search_rows(self, x: Tensor) -> Tensor:
        """(N, C) rows as the search sees them: normalized for the cosine metric."""
        flat = x.detach().reshape(-1, x.shape[-1])
        return F.normalize(flat.float(), dim=1).to(flat.dtype) if self.metric == "cosine" else flat

    def forward(self, z: Tensor) -> VQOutput:
        """Quantize z (float32/float16/bfloat16, D at ``channel_dim``, any number of rows).

        Returns VQOutput(quantized: z's shape and dtype; indices: int64, z's shape without
        the channel dimension, each row's nearest code up to the search's precision bound
        (identical codes resolve to the lowest index, codes closer than the bound either
        way; docs/precision.md); loss: fp32 scalar, codebook_loss + commitment_cost *
        commitment_loss, or commitment_cost * commitment_loss with ``ema``; perplexity:
        fp32 scalar of this batch). In training mode it also runs a pending k-means
        initialization, updates the EMA statistics and re-seeds dead codes (not when z
        holds a NaN or an infinity).
        """
        moved = self._channel_last(z)
        x = self._project_in(moved)
        stored = None if self.simvq else self.codebook
        check_inputs(x, self.basis if self.simvq else stored, self.metric)
        # The search-space rows, only for what reads them: a pending k-means init, the
        # EMA sums, dead-code re-seeding (once per call; a cosine pass over (N, C)).
        needs_rows = self.training and (not self._initted_host or self.ema or self.dead_code_threshold > 0)
        rows = self._search_rows(x) if needs_rows else None
        if self.training and not self._initted_host:
            self._kmeans_init(rows)
        codebook = self.codebook if self.simvq else stored  # the SimVQ product, once per call
        if self.training and (self.ema or self.dead_code_threshold > 0):
            # The op saves the codebook for its backward, and the update below rewrites
            # it in place: the backward would fail on the bumped version (and needs
            # the codes the search chose anyway). A (K, D) copy per training step.
            # index_select, not clone: under torch.compile the min-cut partitioner
            # recomputes a clone in the backward from the buffer the forward mutated
            # (torch 2.13; pytorch/pytorch#197039), which gave the encoder gradients
            # 5% off; index_select is outside its recompute allowlist, so it is saved.
            codebook = codebook.index_select(0, torch.arange(codebook.shape[0], device=codebook.device))
        out = quantize(x, codebook, beta=self.commitment_cost, metric=self.metric, backend=self.backend)
        loss = self.commitment_cost * out.commitment_loss if self.ema else out.loss
        flat_idx = out.indices.reshape(-1)
        if self.training:
            counts = self._update(rows, flat_idx, out.commitment_loss)
        else:
            counts = torch.bincount(flat_idx, minlength=self.num_embeddings)
        quantized = out.quantized
        if self.codebook_dim is not None:
            quantized = self.project_out(quantized).to(moved.dtype)
        quantized = quantized.movedim(-1, self.channel_dim) if self.channel_dim != -1 else quantized
        return VQOutput(quantized, out.indices, loss, perplexity_from_counts(counts))

    # Runs eagerly under torch.compile (a graph break while it is pending; once done,
    # the host flag above keeps it out of the graph): it reads row counts on the host
    # and its collectives depend on them.
    @torch.compiler.disable
    @torch.no_grad()
    def _kmeans_init(self, rows: Tensor) -> None:
        """Gather this batch's search-space rows (N, C); at the last k-means batch, cluster them."""
        # Every rank learns the total, so all of them skip (no rows anywhere) or count alike.
        if sum(distributed.gather_sizes(rows.shape[0], rows.device)) == 0:
            return
        self._kmeans_rows.append(rows.float())
        if len(self._kmeans_rows) < self.kmeans_batches:
            return
        data = torch.cat(self._kmeans_rows)
        total = sum(distributed.gather_sizes(data.shape[0], data.device))  # every rank's rows
        if total < self.num_embeddings:
            per_batch = max(1, total // self.kmeans_batches)
            warnings.warn(f"VectorQuantizer k-means init: {total} rows for {self.num_embeddings} codes, so k-means "
                          f"starts from rows drawn with replacement and repeated codes stay identical (identical "
                          f"codes tie, and only the lowest index is ever chosen). kmeans_batches="
                          f"{-(-self.num_embeddings // per_batch)} or more gives it a row per code.", stacklevel=3)
        centroids, counts = kmeans(data, self.num_embeddings, self.kmeans_iters, metric=self.metric,
                                   sync=distributed.is_distributed(), backend=self.backend)
        # Per-batch counts, the scale of the EMA statistics; an unseen code (k-means
        # seeds repeat when there are fewer rows than codes) counts as seen once, as at
        # construction.
        size = (counts / self.kmeans_batches).clamp(min=1.0)
        if self.simvq:
            self.basis.copy_(centroids)
            self.codebook_map.weight.copy_(torch.eye(centroids.shape[1], device=centroids.device))
        else:
            self.codebook.copy_(centroids.to(self.codebook.dtype))
        self.cluster_size.copy_(size)
        if self.ema:
            self.embed_avg.copy_(centroids * size.unsqueeze(1))
        self.initted.fill_(True)
        self._initted_host = True
        self._kmeans_rows = []

    @torch.no_grad()
    def _update(self, flat: Tensor | None, indices: Tensor, batch_loss: Tensor) -> Tensor:
        """EMA statistics, codebook update and dead-code re-seeding; returns this batch's counts.

        ``flat``: the search-space rows (N, C), None when neither EMA nor dead-code
        re-seeding is on (the counts need only ``indices``). ``batch_loss``: the search's
        mean squared residual over the rows (fp32 scalar), non-finite exactly when a row
        is (or the fp32 sum overflows).
        """
        k = self.num_embeddings
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.ema:
            name = backends.resolve(self.backend, flat.device, flat.dtype, flat.dtype, "l2")
            counts, sums = _library.segment_sum(indices, flat.contiguous(), k, name, deterministic)
        else:
            counts = torch.bincount(indices, minlength=k).float()
        local_counts = counts.clone()
        # A non-finite batch (NaN in z) leaves every buffer as it was: its loss is
        # already NaN, and a poisoned codebook could not recover. Under DDP a NaN on
        # one rank reaches every rank's sums through the all-reduce, so the flag is
        # all-reduced with them and every rank skips the same step. The flag comes from
        # the loss the search already summed: isfinite over the (N, D) rows cost three
        # passes over them (eq, abs, ne), 10% of a CPU training step at 16384 x 2048 x 64.
        nonfinite = (~torch.isfinite(batch_loss)).float()
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
