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
from .rotation import rotate_to

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vector_quantize_pytorch arguments the drop-in does not implement, with the
# defaults under which they are inert.
UNSUPPORTED = dict(
    freeze_codebook=False, sync_kmeans=True, layernorm_after_project_in=False, accept_3d_fmap=False,
    commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False,
    orthogonal_reg_max_codes=None, codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
    stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False, directional_reparam=False,
    directional_reparam_variance=5e-3, sync_affine_param=False, vq_bridge=None, manual_ema_update=False,
    in_place_codebook_optimizer=None, manual_in_place_optimizer_update=False, affine_param=False,
    affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, sync_update_v=0.0,
    return_zeros_for_masked_padding=True, route_gradients_to_input=True,
)
UNSUPPORTED_FORWARD = dict(
    indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None, freeze_codebook=None,
    codebook_transform_fn=None, ema_update_weight=None, accum_ema_update=False, ema_update=None,
)


class VectorQuantize(nn.Module):
    """Vector quantization layer, argument- and checkpoint-compatible with vector-quantize-pytorch.

    Supported options (meanings and defaults as vector_quantize_pytorch 1.32):
    ``dim, codebook_size, codebook_dim, heads, separate_codebook_per_head, decay, eps,
    kmeans_init, kmeans_iters, use_cosine_sim, threshold_ema_dead_code, channel_last,
    accept_image_fmap, commitment_weight, rotation_trick, learnable_codebook,
    ema_update, sync_codebook``; any other argument away from its default raises
    NotImplementedError naming it. ``backend`` (keyword) picks vqkern's backend.

    forward(x) with x of shape (B, N, dim) (channel_last), (B, dim, N) (not
    channel_last), (B, dim, H, W) (accept_image_fmap) or (B, dim) returns
    ``(quantized, indices, loss)``: quantized like x in x's dtype, indices int64 of
    shape (B, N) / (B, H, W) / (B,) with a trailing ``heads`` axis when heads > 1,
    loss a float32 scalar (commitment_weight * mse(sg[q], x) in training, 0 in eval).
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
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")

        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False (the codebook is then learned by gradient)")

        self.dim, self.heads, self.separate_codebook_per_head = dim, heads, separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        requires_projection = codebook_input_dim != dim
        # Created in vector_quantize_pytorch's order (project_in, project_out,
        # codebook) so that one seed gives both classes the same initial weights.
        self.project_in = nn.Linear(dim, codebook_input_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_input_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0.0
        self.learnable_codebook = learnable_codebook
        self.rotation_trick = rotation_trick
        self.use_cosine_sim = use_cosine_sim
        self.codebook_size = codebook_size
        self.accept_image_fmap, self.channel_last = accept_image_fmap, channel_last
        if sync_codebook is None:
            sync_codebook = distributed.is_distributed()
        self._codebook = Codebook(
            codebook_dim, codebook_size, heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code, use_ddp=bool(sync_codebook),
            learnable_codebook=learnable_codebook, ema_update=ema_update, use_cosine_sim=use_cosine_sim,
            backend=backend)
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
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        self._codebook.embed.data.copy_(codes)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes of the int64 indices forward returned (before project_out), laid out as
        vector_quantize_pytorch lays them out: (..., D) for one codebook (one code per
        head for a shared multi-head codebook), (..., heads * D) for separate codebooks."""
        codebook = self.codebook
        if codebook.dim() == 2:
            codes = codebook[indices]
        else:
            codes = torch.stack([codebook[h][indices[..., h]] for h in range(codebook.shape[0])], dim=-2)
            codes = codes.flatten(-2)
        if not self.channel_last or self.accept_image_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The layer's output for int64 indices as forward returned them: the codes
        (see :meth:`get_codes_from_indices`) through ``project_out``, float32 (..., dim)."""
        return self.project_out(self.get_codes_from_indices(indices))

    # ---- head layout ------------------------------------------------------------

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, N, H*D) -> (C, rows, N, D): (H, B, N, D) for separate codebooks, (1, B*H, N, D) shared."""
        b, n, features = x.shape
        if self.heads == 1:
            return x.unsqueeze(0)
        # Explicit sizes, not -1: a batch with no rows must still reshape.
        d = features // self.heads
        x = x.reshape(b, n, self.heads, d)
        if self.separate_codebook_per_head:
            return x.permute(2, 0, 1, 3)
        return x.permute(0, 2, 1, 3).reshape(1, b * self.heads, n, d)

    def _merge_heads(self, t: Tensor, b: int) -> Tensor:
        """Inverse of _split_heads for (C, rows, N, ...) -> (B, N, heads, ...)."""
        if self.heads == 1:
            return t[0].unsqueeze(2)
        if self.separate_codebook_per_head:
            return t.movedim(0, 2)
        t = t[0].reshape(b, self.heads, *t.shape[2:])
        return t.movedim(1, 2)

    # ---- forward ------------------------------------------------------------------

    def forward(self, x: Tensor, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        """x: float (B, N, dim), (B, dim, N), (B, dim, H, W) or (B, dim) (see the class).

        Returns (quantized like x in x's dtype, indices int64 (B, N) / (B, H, W) / (B,)
        with a trailing heads axis when heads > 1, loss float32 scalar), plus a
        LossBreakdown of scalars with ``return_loss_breakdown=True``.
        """
        reject_unsupported("VectorQuantize.forward", dict(
            indices=indices, mask=mask, lens=lens, topk=topk, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, codebook_transform_fn=codebook_transform_fn,
            ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update, ema_update=ema_update),
            UNSUPPORTED_FORWARD)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {type(x).__name__}")
        input_requires_grad = x.requires_grad
        only_one = x.dim() == 2
        if only_one:
            x = x.unsqueeze(1)
        need_transpose = not self.channel_last and not self.accept_image_fmap and not only_one
        if self.accept_image_fmap:
            if x.dim() != 4:
                raise ValueError(f"x must be (B, C, H, W) with accept_image_fmap=True, got {tuple(x.shape)}")
            height, width = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
        elif x.dim() != 3:
            raise ValueError(f"x must be (B, N, dim), (B, dim, N) or (B, dim), got {tuple(x.shape)}")
        if need_transpose:
            x = x.transpose(1, 2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} features, got {x.shape[-1]} (shape {tuple(x.shape)})")
        batch = x.shape[0]

        x = self.project_in(x)
        x = self._split_heads(x)
        x = self._codebook.transform_input(x)
        dtype = x.dtype

        c, rows, n, d = x.shape
        flatten = x.float().reshape(c, rows * n, d)
        update = self.training
        quantize, embed_ind = self._codebook(flatten, update=update)
        quantize = quantize.reshape(c, rows, n, d).type(dtype)
        embed_ind = embed_ind.reshape(c, rows, n)

        commit_loss = self.zero
        if self.training:
            commit_quantize = quantize if self.learnable_codebook else quantize.detach()
            if input_requires_grad:
                if self.rotation_trick:
                    quantize = rotate_to(x, quantize)
                else:
                    quantize = x + (quantize - x).detach()

        embed_ind = self._merge_heads(embed_ind, batch)
        if self.heads == 1:
            embed_ind = embed_ind[..., 0]
        if self.accept_image_fmap:
            embed_ind = embed_ind.reshape(batch, height, width, *embed_ind.shape[2:])
        if only_one:
            embed_ind = embed_ind[:, 0]

        if self.training:
            loss = self.zero
            if not torch.compiler.is_compiling():
                # vector_quantize_pytorch's training loss always requires grad, even
                # with no loss term; dynamo cannot return such a fresh leaf.
                loss = loss.clone().requires_grad_()
            if self.has_commitment_loss:
                commit_loss = F.mse_loss(commit_quantize, x)
                loss = loss + commit_loss * self.commitment_weight
        else:
            loss = self.zero

        quantize = self._merge_heads(quantize, batch).flatten(-2)
        quantize = self.project_out(quantize)
        if need_transpose:
            quantize = quantize.transpose(1, 2)
        if self.accept_image_fmap:
            quantize = quantize.transpose(1, 2).reshape(batch, quantize.shape[-1], height, width)
        if only_one:
            quantize = quantize[:, 0]

        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, LossBreakdown(commit_loss, self.zero, self.zero, self.zero)
