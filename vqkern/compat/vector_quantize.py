"""Drop-in for ``vector_quantize_pytorch.VectorQuantize`` on vqkern's fused kernels.

Switch with one line: ``from vqkern import VectorQuantize``. Same constructor
arguments (for the supported options), defaults, outputs and state_dict as
vector-quantize-pytorch 1.32; the nearest-code search runs through
``vqkern.nearest_code`` and the EMA statistics through ``vqkern.segment_sum``, so
no N x K distance matrix or one-hot is ever built.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, distributed
from ._args import reject_unsupported
from .codebook import Codebook
from .layout import check_indices, check_mask, merge_heads, split_heads, split_mask, to_rows
from .losses import codebook_diversity_loss, mean_cross_entropy
from .rotation import directional_reparam as directional_reparam_fn
from .rotation import rotate_to
from .topk import finish_topk

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vector_quantize_pytorch arguments the drop-in does not implement, with the
# defaults under which they are inert.
UNSUPPORTED = dict(
    straight_through=False, sync_affine_param=False, vq_bridge=None,
    in_place_codebook_optimizer=None, affine_param=False,
    affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9,
)


class VectorQuantize(nn.Module):
    """Vector quantization layer, argument- and checkpoint-compatible with vector-quantize-pytorch.

    Supported options (meanings and defaults as vector_quantize_pytorch 1.32):
    ``dim, codebook_size, codebook_dim, heads, separate_codebook_per_head, decay, eps,
    freeze_codebook, kmeans_init, kmeans_iters, sync_kmeans, use_cosine_sim,
    layernorm_after_project_in, threshold_ema_dead_code, channel_last,
    accept_image_fmap, accept_3d_fmap, commitment_weight, stochastic_sample_codes,
    sample_codebook_temp, rotation_trick, sync_codebook, ema_update, manual_ema_update,
    learnable_codebook, manual_in_place_optimizer_update, return_zeros_for_masked_padding,
    route_gradients_to_input``; any other argument away from its default raises
    NotImplementedError naming it. ``backend`` (keyword) picks vqkern's backend.

    forward(x) with x of shape (B, N, dim) (channel_last), (B, dim, N) (not
    channel_last), (B, dim, H, W) (accept_image_fmap), (B, dim, D, H, W)
    (accept_3d_fmap) or (B, dim) returns ``(quantized, indices, loss)``: quantized like
    x in x's dtype, indices int64 of shape (B, N) / (B, H, W) / (B, D, H, W) / (B,)
    with a trailing ``heads`` axis when heads > 1 (-1 at masked positions), loss a
    float32 scalar (commitment_weight * mse(sg[q], x) in training, 0 in eval).
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False,
                 decay=0.8, eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10,
                 sync_kmeans=True, use_cosine_sim=False, layernorm_after_project_in=False,
                 threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False, accept_3d_fmap=False,
                 commitment_weight=1.0, commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0,
                 orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
                 stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False,
                 rotation_trick=None, directional_reparam=False, directional_reparam_variance=5e-3,
                 sync_codebook=None, sync_affine_param=False, ema_update=None, vq_bridge=None,
                 manual_ema_update=False, learnable_codebook=None, in_place_codebook_optimizer=None,
                 manual_in_place_optimizer_update=False, affine_param=False, affine_param_batch_decay=0.99,
                 affine_param_codebook_decay=0.9, sync_update_v=0.0, return_zeros_for_masked_padding=True,
                 route_gradients_to_input=True, *, backend: str = "auto"):
        super().__init__()
        given = dict(locals())
        reject_unsupported("VectorQuantize", given, UNSUPPORTED)
        for name in ("dim", "codebook_size", "heads", "kmeans_iters"):
            value = given[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be a positive int or None, got {codebook_dim!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if not float(sample_codebook_temp) >= 0.0:
            raise ValueError(f"sample_codebook_temp must be >= 0, got {sample_codebook_temp}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")

        directional_reparam = bool(directional_reparam)
        ema_update = (not directional_reparam) if ema_update is None else bool(ema_update)
        learnable_codebook = directional_reparam if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = (not directional_reparam and dim > 1) if rotation_trick is None else bool(rotation_trick)
        if rotation_trick and directional_reparam:
            raise ValueError("rotation_trick and directional_reparam cannot both be True")
        if directional_reparam and not threshold_ema_dead_code > 0:
            raise ValueError("directional_reparam=True needs threshold_ema_dead_code > 0 (periodic dead-code "
                             "replacement), as in vector_quantize_pytorch")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False "
                             "(the codebook is then learned by gradient)")
        if not 0.0 <= float(sync_update_v) <= 1.0:
            raise ValueError(f"sync_update_v must lie in [0, 1], got {sync_update_v}")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")
        self.sync_update_v = float(sync_update_v)
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0.0
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0.0
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        if self.orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ValueError("orthogonal_reg_active_codes_only is not compatible with separate codebooks per head")

        self.dim, self.heads, self.separate_codebook_per_head = dim, heads, separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        requires_projection = codebook_input_dim != dim
        # Created in vector_quantize_pytorch's order (project_in, project_out,
        # codebook) so that one seed gives both classes the same initial weights.
        if requires_projection:
            self.project_in = nn.Linear(dim, codebook_input_dim)
            if layernorm_after_project_in:
                self.project_in = nn.Sequential(self.project_in, nn.LayerNorm(codebook_input_dim))
        else:
            self.project_in = nn.Identity()
        self.project_out = nn.Linear(codebook_input_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0.0 and not directional_reparam
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = float(directional_reparam_variance)
        self.commitment_use_cross_entropy_loss = bool(commitment_use_cross_entropy_loss)
        self.learnable_codebook = learnable_codebook
        self.rotation_trick = rotation_trick
        self.use_cosine_sim = use_cosine_sim
        self.codebook_size = codebook_size
        self.accept_image_fmap, self.accept_3d_fmap, self.channel_last = accept_image_fmap, accept_3d_fmap, channel_last
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.freeze_codebook = bool(freeze_codebook)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        if sync_codebook is None:
            sync_codebook = distributed.is_distributed()
        self._codebook = Codebook(
            codebook_dim, codebook_size, heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code, use_ddp=bool(sync_codebook),
            # The orthogonal loss reaches the codes by gradient, so they are a Parameter then (as upstream).
            learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0.0, ema_update=ema_update,
            use_cosine_sim=use_cosine_sim,
            backend=backend, manual_ema_update=bool(manual_ema_update), sync_kmeans=bool(sync_kmeans))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def ema_update(self) -> bool:
        """Whether the codebook follows EMA statistics (else it is learned by gradient or frozen)."""
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        """(K, D), or (heads, K, D) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        """Overwrite the codes in place: (K, D), or (heads, K, D) with separate codebooks per head."""
        expected = tuple(self._codebook.embed.shape[int(not self.separate_codebook_per_head):])
        if tuple(codes.shape) != expected:
            raise ValueError(f"codebook must have shape {expected}, got {tuple(codes.shape)}")
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        self._codebook.embed.data.copy_(codes)

    @property
    def _is_fmap(self) -> bool:
        return self.accept_image_fmap or self.accept_3d_fmap

    @property
    def _head_layout(self) -> tuple[int, bool]:
        """(heads, separate codebook per head): the arguments of the layout functions."""
        return self.heads, self.separate_codebook_per_head

    def _to_rows(self, x: Tensor):
        return to_rows(x, self.accept_image_fmap, self.accept_3d_fmap, self.channel_last)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes of the int64 indices forward returned (before project_out), laid out as
        vector_quantize_pytorch lays them out: (..., D) for one codebook (one code per
        head for a shared multi-head codebook), (..., heads * D) for separate codebooks;
        channels moved to dim 1 for channel-first and feature-map layouts."""
        codebook = self.codebook
        if codebook.dim() == 2:
            codes = codebook[indices]
        else:
            codes = torch.stack([codebook[h][indices[..., h]] for h in range(codebook.shape[0])], dim=-2)
            codes = codes.flatten(-2)
        if not self.channel_last or self._is_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The layer's output for int64 indices as forward returned them: the codes
        (see :meth:`get_codes_from_indices`) through ``project_out``, float32 (..., dim)."""
        return self.project_out(self.get_codes_from_indices(indices))

    # ---- EMA from outside -------------------------------------------------------------

    def _codebook_rows(self, x: Tensor) -> Tensor:
        """(B, N, dim) rows -> (C, rows, N, D) codebook inputs (projected, split, normalized)."""
        return self._codebook.transform_input(split_heads(self.project_in(x), *self._head_layout))

    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """Run the EMA update (and dead-code re-seeding in training) for codes chosen elsewhere.

        Args:
            x: the layer's input, in forward's layout.
            indices: int64 codes in forward's output layout (-1 marks a row without a code,
                which takes no part, like a masked row).
            mask: optional (B, N) bool; False rows take no part.
        """
        if self._is_fmap and mask is not None:
            raise ValueError("mask is not supported with accept_image_fmap or accept_3d_fmap")
        if x.dim() == 2:
            x, indices = x.unsqueeze(1), indices.unsqueeze(1)
        else:
            x, _ = self._to_rows(x)
        b, n = x.shape[:2]
        with torch.no_grad():
            flat = self._codebook_rows(x).float()
        c, r, _, d = flat.shape
        # (B, N, heads) through the head split as features of size 1: (C, rows, N, 1).
        ind = split_heads(indices.reshape(b, n, self.heads), *self._head_layout)
        cb_mask = None
        if mask is not None:
            cb_mask = check_mask(mask, b, n).to(x.device)
            cb_mask = split_mask(cb_mask, *self._head_layout).reshape(c, r * n)
        self._codebook.update_indices(flat.reshape(c, r * n, d), ind.reshape(c, r * n), mask=cb_mask)

    update_ema_indices = update_indices

    def expire_codes_(self, x: Tensor) -> None:
        """Re-seed dead codes (training only) from float rows x (B, M, codebook_dim) in codebook space.

        As vector_quantize_pytorch (whose ResidualVQ calls this with a shared codebook),
        the leading axis is taken as the codebook axis: codebook c draws from x[c], so a
        single codebook draws from the first batch element's rows only.
        """
        if self.heads != 1:
            raise ValueError("expire_codes_ supports heads = 1 (as ResidualVQ uses it)")
        flat = self._codebook.transform_input(x)[: self._codebook.num_codebooks]
        self._codebook.expire_codes_(flat.detach().float())

    def update_in_place_optimizer(self) -> None:
        """No in-place codebook optimizer is supported, so there is nothing to step."""

    # ---- forward ------------------------------------------------------------------

    def _straight_through(self, x: Tensor, quantize: Tensor) -> Tensor:
        """The forward value of quantize with the gradient estimator of the options."""
        if self.rotation_trick:
            return rotate_to(x, quantize)
        if self.directional_reparam:
            return directional_reparam_fn(x, quantize, self.directional_reparam_variance)
        return x + (quantize - x).detach()

    @staticmethod
    def _transform(fn, b: int, n: int):
        def transform(embed):
            codes = fn(embed)
            if codes.dim() != 5 or codes.shape[1:3] != (b, n):
                raise ValueError(f"codebook_transform_fn must return codes of shape (C, B, N, K, D) with "
                                 f"B, N = {b}, {n}, got {tuple(codes.shape)}")
            return codes
        return transform

    def _orthogonal_loss(self, embed_ind: Tensor) -> Tensor:
        """Eq. (2) of https://arxiv.org/abs/2112.00384 over the codes (of this batch with
        ``orthogonal_reg_active_codes_only``; at most ``orthogonal_reg_max_codes``, drawn at
        random): a (C, K', K') code-by-code matrix, never one of rows by codes."""
        codebook = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            codebook = codebook[:, torch.unique(embed_ind)]
        num_codes = codebook.shape[-2]
        if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
            codebook = codebook[:, torch.randperm(num_codes, device=codebook.device)[:self.orthogonal_reg_max_codes]]
        h, n = codebook.shape[:2]
        normed = F.normalize(codebook, p=2, dim=-1, eps=1e-6)
        cosine = normed @ normed.transpose(-1, -2)
        return cosine.square().sum() / (h * n ** 2) - 1 / n

    def _sync_update(self, quantize: Tensor) -> Tensor:
        # Rule (21) of https://minyoungg.github.io/vqtorch/assets/draft_050523.pdf: the
        # codebook's gradient also moves it with the encoder (optimistic for v > 0).
        if self.sync_update_v > 0:
            return quantize + self.sync_update_v * (quantize - quantize.detach())
        return quantize

    def forward(self, x: Tensor, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        """x: float (B, N, dim), (B, dim, N), (B, dim, H, W), (B, dim, D, H, W) or (B, dim) (see the class).

        Args:
            mask: optional (B, N) bool, True for real rows; or ``lens`` (B,) int64 lengths.
                Padding rows take no part in the loss, the EMA statistics, k-means
                initialization or dead-code re-seeding; their output is 0 (or the input
                with ``return_zeros_for_masked_padding=False``) and their index -1.
            sample_codebook_temp: temperature of ``stochastic_sample_codes`` for this call.
            freeze_codebook: leave the codebook as it is for this call.
            ema_update_weight: per-code weight of this step's EMA move, (K,) / (C, K) or a
                callable ``(sums, counts) -> weight``.
            accum_ema_update: accumulate this step's statistics for the next update.
            ema_update: override the constructor's ``ema_update`` for this call.
            codebook_transform_fn: callable embed (1, K, D) -> codes (1, B, N, K, D) made for
                each row (heads = 1), searched and returned in place of the codebook.
        Returns (quantized like x in x's dtype, indices int64 (B, N) / (B, H, W) / (B, D, H, W) /
        (B,) with a trailing heads axis when heads > 1, loss float32 scalar), plus a
        LossBreakdown of scalars with ``return_loss_breakdown=True``.
        """
        if codebook_transform_fn is not None and (self.heads != 1 or topk is not None):
            raise ValueError("codebook_transform_fn needs heads = 1 and no topk")
        if topk is not None:
            if isinstance(topk, bool) or int(topk) != topk or topk < 1:
                raise ValueError(f"topk must be a positive int, got {topk!r}")
            topk = min(int(topk), self.codebook_size)
            if self.heads != 1 or indices is not None or (self.training and (
                    self.commitment_use_cross_entropy_loss or self.has_codebook_diversity_loss)):
                raise ValueError("topk needs heads = 1, no indices, and in training no cross-entropy commitment "
                                 "or codebook diversity loss")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {type(x).__name__}")
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        temp = self.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        if not temp >= 0:
            raise ValueError(f"sample_codebook_temp must be >= 0, got {sample_codebook_temp}")
        if lens is not None and (not isinstance(lens, Tensor) or lens.dim() != 1 or lens.dtype.is_floating_point):
            raise ValueError(f"lens must be a (B,) integer tensor, got {getattr(lens, 'shape', type(lens))}")
        input_requires_grad = x.requires_grad
        only_one = x.dim() == 2
        if only_one:
            if mask is not None or lens is not None:
                raise ValueError("mask (or lens) needs a sequence: x is (B, dim)")
            x = x.unsqueeze(1)
            unlayout = lambda t, channels_first: t  # noqa: E731
        else:
            if (mask is not None or lens is not None) and self._is_fmap:
                raise ValueError("mask (or lens) is not supported with accept_image_fmap or accept_3d_fmap")
            x, unlayout = self._to_rows(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} features, got {x.shape[-1]} (shape {tuple(x.shape)})")
        batch, n = x.shape[:2]
        if lens is not None:
            # Lengths along the sequence axis whatever the layout (vector_quantize_pytorch
            # measures them along x.shape[1], the features of a channel-first input).
            mask = torch.arange(n, device=lens.device) < lens[:, None]
        if mask is not None:
            mask = check_mask(mask, batch, n).to(x.device)
        orig_input = x

        x = self._codebook_rows(x)
        dtype = x.dtype

        c, rows, n, d = x.shape
        row_mask = None if mask is None else split_mask(mask, *self._head_layout)
        flatten = x.float().reshape(c, rows * n, d)
        stochastic = self.stochastic_sample_codes and self.training and temp > 0
        wants_ce = indices is not None or (self.training and self.has_commitment_loss
                                           and self.commitment_use_cross_entropy_loss) or (
            self.training and self.has_codebook_diversity_loss)
        if wants_ce:
            if indices is not None:
                target = check_indices(indices, batch, n, self.heads, self.codebook_size)
                target = split_heads(target, *self._head_layout).reshape(c, rows * n)
            # The logits are those of the codebook before this step's EMA update rewrites it.
            ce_embed = self._codebook.embed if self.learnable_codebook else self._codebook.embed.detach().clone()
        quantize, embed_ind = self._codebook(
            flatten, update=self.training and not freeze,
            mask=None if row_mask is None else row_mask.reshape(c, rows * n),
            sample_temp=temp if stochastic else 0.0, ema_update=ema_update,
            ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update, topk=topk,
            transform=None if codebook_transform_fn is None else self._transform(codebook_transform_fn, batch, n))
        if topk is not None:
            out = finish_topk(self, x[0], quantize.reshape(rows, n, topk, d).type(dtype),
                                    embed_ind.reshape(rows, n, topk), mask, orig_input, freeze,
                                    input_requires_grad)
            quantize, embed_ind, loss, commit_loss, orthogonal_reg_loss = out
            if only_one:
                quantize, embed_ind, loss = quantize[:, 0], embed_ind[:, 0], (loss[:, 0] if loss.dim() else loss)
            else:
                quantize, embed_ind = unlayout(quantize, True), unlayout(embed_ind, False)
                loss = unlayout(loss, False) if loss.dim() else loss
            if not return_loss_breakdown:
                return quantize, embed_ind, loss
            # No diversity term with topk (the codebook's diversity loss needs the single search).
            return quantize, embed_ind, loss, LossBreakdown(commit_loss, self.zero, orthogonal_reg_loss, self.zero)
        quantize = quantize.reshape(c, rows, n, d).type(dtype)
        codes_flat = embed_ind
        embed_ind = embed_ind.reshape(c, rows, n)

        commit_loss = orthogonal_reg_loss = diversity_loss = self.zero
        if self.training:
            commit_quantize = quantize if self.learnable_codebook and not freeze else quantize.detach()
            if input_requires_grad and self.route_gradients_to_input:
                quantize = self._straight_through(x, quantize)
            quantize = self._sync_update(quantize)

        if indices is not None:
            # As vector_quantize_pytorch: the quantized codes (codebook space, before
            # project_out) and the cross-entropy of the given codes.
            ce = mean_cross_entropy(flatten, ce_embed, target, cosine=self.use_cosine_sim)
            return (quantize[0] if self.heads == 1 else quantize), ce

        embed_ind = merge_heads(embed_ind, batch, *self._head_layout)
        if self.heads == 1:
            embed_ind = embed_ind[..., 0]

        if self.training:
            loss = self.zero
            if not torch.compiler.is_compiling():
                # vector_quantize_pytorch's training loss always requires grad, even
                # with no loss term; dynamo cannot return such a fresh leaf.
                loss = loss.clone().requires_grad_()
            if self.has_codebook_diversity_loss:
                diversity_loss = codebook_diversity_loss(flatten, ce_embed, positions=n,
                                                         temperature=self.codebook_diversity_temperature,
                                                         cosine=self.use_cosine_sim)
                loss = loss + diversity_loss * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    target = codes_flat if row_mask is None else codes_flat.masked_fill(
                        ~row_mask.reshape(c, rows * n), -1)
                    commit_loss = mean_cross_entropy(flatten, ce_embed, target, cosine=self.use_cosine_sim)
                elif mask is None:
                    commit_loss = F.mse_loss(commit_quantize, x)
                elif self.heads == 1 and not self.has_projections:
                    # Against the layer's input as given, as vector_quantize_pytorch does
                    # (for the cosine metric that is the input before its l2 normalization).
                    commit_loss = F.mse_loss(commit_quantize[0], orig_input, reduction="none")[mask].mean()
                else:
                    commit_loss = F.mse_loss(commit_quantize, x, reduction="none")[row_mask].mean()
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                orthogonal_reg_loss = self._orthogonal_loss(embed_ind)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight
        else:
            loss = self.zero

        quantize = merge_heads(quantize, batch, *self._head_layout).flatten(-2)
        quantize = self.project_out(quantize)
        if mask is not None:
            padding = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding else orig_input
            quantize = torch.where(mask.unsqueeze(-1), quantize, padding)
            ind_mask = mask.unsqueeze(-1) if self.heads > 1 else mask
            embed_ind = embed_ind.masked_fill(~ind_mask, -1)

        if only_one:
            quantize, embed_ind = quantize[:, 0], embed_ind[:, 0]
        else:
            quantize = unlayout(quantize, True)
            embed_ind = unlayout(embed_ind, False)

        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, LossBreakdown(commit_loss, diversity_loss, orthogonal_reg_loss, self.zero)
