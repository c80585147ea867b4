"""Drop-in for ``vector_quantize_pytorch.LFQ``: lookup-free quantization (MAGVIT-v2,
https://arxiv.org/abs/2310.05737) whose entropy loss is exact and streamed.

Switch with one line: ``from vqkern import LFQ``. Same arguments, defaults, outputs and
state_dict as vector-quantize-pytorch 1.32. The code of a row is the sign pattern of
its features (no search); the training loss's entropy terms, which vector-quantize-pytorch
forms from an (N, 2^d) softmax (17 GB of fp32 at 2^18 codes and 16,384 rows), come
from ``vqkern.lfq_entropy``: the same values, O(N d + 2^d) memory.
"""
from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.amp import autocast

from .. import backends, distributed
from ..lfq_entropy import lfq_entropy

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

ENTROPY_EPS = 1e-5  # vector-quantize-pytorch's clamp inside its entropy's log


def entropy_of(prob: Tensor) -> Tensor:
    """vector-quantize-pytorch's entropy over the last dimension: prob (..., K) float ->
    (...) float, -sum p log(max(p, 1e-5))."""
    return (-prob * prob.clamp(min=ENTROPY_EPS).log()).sum(dim=-1)


def distributed_mean(t: Tensor) -> Tensor:
    """The mean over ranks of t (any shape, float), differentiable (torch.distributed.nn); t
    itself outside a process group. vector-quantize-pytorch 1.32's ``maybe_distributed_mean``
    means this but discards the all-reduce's result (``torch.distributed.nn.all_reduce``
    returns a new tensor), so it returns t / world_size, a distribution that sums to 1 / W."""
    if not distributed.is_distributed():
        return t
    from torch.distributed import nn as dist_nn
    return dist_nn.all_reduce(t) / distributed.world_size()


def to_rows(x: Tensor) -> tuple[Tensor, tuple]:
    """x (B, dim, *spatial) float -> (rows of shape (B, prod(spatial), dim), spatial)."""
    x = x.movedim(1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]), tuple(x.shape[1:-1])


def from_rows(t: Tensor, spatial: tuple) -> Tensor:
    """t (B, prod(spatial), F) of any dtype -> (B, F, *spatial)."""
    return t.reshape(t.shape[0], *spatial, t.shape[-1]).movedim(-1, 1)


class CosineSimLinear(nn.Module):
    """Linear map of l2-normalized rows by l2-normalized columns, times ``scale``
    (vector-quantize-pytorch's ``cosine_sim_project_in``); ``weight`` (dim_in, dim_out)."""

    def __init__(self, dim_in, dim_out, scale=1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim_in) float -> (..., dim_out) float."""
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class LFQ(nn.Module):
    """Lookup-free quantization, argument- and checkpoint-compatible with vector-quantize-pytorch.

    Every argument of vector_quantize_pytorch 1.32's ``LFQ`` is supported, with its
    default: ``dim, codebook_size, entropy_loss_weight, commitment_loss_weight,
    diversity_gamma, straight_through_activation, num_codebooks, keep_num_codebooks_dim,
    codebook_scale, frac_per_sample_entropy, has_projections, projection_has_bias,
    soft_clamp_input_value, cosine_sim_project_in, cosine_sim_project_in_scale,
    channel_first, experimental_softplus_entropy_loss, entropy_loss_offset, spherical,
    force_quantization_f32, orthogonal_rotation``. vqkern's own keywords: ``backend``
    (of the entropy op) and ``exact_masked_batch_entropy`` (see forward).

    forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None): x (B, N, dim),
    or (B, dim, ...) for images and video (or with ``channel_first``), any float dtype.
    Returns ``Return(quantized, indices, entropy_aux_loss)``: quantized like x, indices
    int64 (B, N) (or (B, ...), with a trailing num_codebooks axis when kept),
    entropy_aux_loss a float32 scalar (0 in eval); with ``return_loss_breakdown`` also
    ``LossBreakdown(per_sample_entropy, batch_entropy, commitment)``. ``mask`` (B,) or
    (B, N) bool picks the rows that take part in the losses. With a (B, N) mask,
    vector-quantize-pytorch's batch entropy is the mean of the rows' entropies (its
    average over rows collapses to no average), so its entropy loss is
    ``(1 - diversity_gamma)`` times the per-row term; this class gives the same by
    default, and the entropy of the masked rows' average distribution with
    ``exact_masked_batch_entropy=True``.
    """

    def __init__(self, *, dim=None, codebook_size=None, entropy_loss_weight=0.1, commitment_loss_weight=0.0,
                 diversity_gamma=1.0, straight_through_activation=None, num_codebooks=1,
                 keep_num_codebooks_dim=None, codebook_scale=1.0, frac_per_sample_entropy=1.0,
                 has_projections=None, projection_has_bias=True, soft_clamp_input_value=None,
                 cosine_sim_project_in=False, cosine_sim_project_in_scale=None, channel_first=None,
                 experimental_softplus_entropy_loss=False, entropy_loss_offset=5.0, spherical=False,
                 force_quantization_f32=True, orthogonal_rotation=False, backend: str = "auto",
                 exact_masked_batch_entropy: bool = False):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size")
        if codebook_size is not None:
            if not isinstance(codebook_size, int) or codebook_size < 2 or codebook_size & (codebook_size - 1):
                raise ValueError(f"codebook_size must be a power of 2 (>= 2) for lookup-free quantization, "
                                 f"got {codebook_size!r}")
        if not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        codebook_size = 2 ** dim if codebook_size is None else codebook_size
        codebook_dim = int(math.log2(codebook_size))
        from ..lfq_entropy import MAX_BITS
        if codebook_dim > MAX_BITS:
            raise ValueError(f"codebook_size must be at most 2^{MAX_BITS}, got 2^{codebook_dim}")
        if not 0.0 < float(frac_per_sample_entropy) <= 1.0:
            raise ValueError(f"frac_per_sample_entropy must lie in (0, 1], got {frac_per_sample_entropy}")
        if soft_clamp_input_value is not None and not soft_clamp_input_value >= codebook_scale:
            raise ValueError(f"soft_clamp_input_value ({soft_clamp_input_value}) must be >= codebook_scale "
                             f"({codebook_scale})")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")

        self.codebook_size, self.codebook_dim, self.num_codebooks = codebook_size, codebook_dim, num_codebooks
        codebook_dims = codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else dim
        self.dim = dim
        has_projections = dim != codebook_dims if has_projections is None else bool(has_projections)
        self.has_projections = has_projections
        # Created in vector_quantize_pytorch's order, so one seed gives both the same weights.
        if not has_projections:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        else:
            if cosine_sim_project_in:
                scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = nn.Identity() if straight_through_activation is None else straight_through_activation
        self.spherical = bool(spherical)
        self.orthogonal_rotation = bool(orthogonal_rotation)
        if self.orthogonal_rotation:
            rot = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        self.frac_per_sample_entropy = float(frac_per_sample_entropy)
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = bool(experimental_softplus_entropy_loss)
        self.force_quantization_f32 = bool(force_quantization_f32)
        self.backend = backend
        self.exact_masked_batch_entropy = bool(exact_masked_batch_entropy)
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        # Its dtype and device follow the module (.half(), .to()), as vector_quantize_pytorch's
        # codebook buffer does; the codebook itself is computed on access (see codebook).
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # ---- codes -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the codes (the module's, after .half() or .to())."""
        return self.zero.dtype

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, codebook_dim) codes in {-codebook_scale, +codebook_scale}, as
        vector_quantize_pytorch's (non-persistent) buffer; formed on each access (2^d x d),
        since neither the forward nor the loss needs it."""
        bits = ((torch.arange(self.codebook_size, device=self.mask.device)[:, None] & self.mask) != 0)
        return self.bits_to_codes(bits.to(self.dtype))

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """bits (..., d) float in {0, 1} -> codes (..., d) in {-codebook_scale, +codebook_scale}."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def maybe_l2norm(self, t: Tensor) -> Tensor:
        """t (..., d) float, l2-normalized and scaled by codebook_scale when spherical."""
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices int64/int32 (..., [num_codebooks]) -> the float codes forward outputs for them:
        (..., dim) (projected out) or (..., num_codebooks * codebook_dim), channel first for images."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        should_transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        bits = ((indices[..., None].int() & self.mask) != 0).to(self.dtype)
        codes = self.maybe_l2norm(self.bits_to_codes(bits))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if should_transpose:
            codes = codes.movedim(-1, 1)
        return codes

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False,
                mask: Tensor | None = None):
        """x (B, N, dim) or (B, dim, ...) float -> ``Return(quantized like x, indices int64,
        aux loss fp32 scalar)`` (and the ``LossBreakdown``); see the class docstring."""
        return lfq_forward(self, x, inv_temperature, return_loss_breakdown, mask, backend=self.backend,
                           exact_masked_batch_entropy=self.exact_masked_batch_entropy)


# The forward and its losses are functions of the layer rather than methods, so that
# vqkern.patch runs this same code on vector_quantize_pytorch's own LFQ instances. They read
# only attributes that both classes have under the same names and meanings: channel_first,
# dim, project_in, project_out, soft_clamp_input_value, num_codebooks, codebook_dim,
# orthogonal_rotation, orthogonal_rot, maybe_l2norm, spherical, force_quantization_f32,
# codebook_scale, mask, zero, training, activation, frac_per_sample_entropy, diversity_gamma,
# experimental_softplus_entropy_loss, entropy_loss_offset, commitment_loss_weight,
# entropy_loss_weight, keep_num_codebooks_dim.

def entropy_terms(layer: nn.Module, original_input: Tensor, mask: Tensor | None, inv_temperature: float, *,
                  backend: str, exact_masked_batch_entropy: bool):
    """(per-sample entropy, batch entropy) fp32 scalars as vector_quantize_pytorch defines them,
    both from vqkern.lfq_entropy; original_input (B, N, C, d) float in the quantizer's precision."""
    rows = original_input if mask is None else original_input[mask]
    if exact_masked_batch_entropy:
        rows = rows.reshape(-1, layer.num_codebooks, layer.codebook_dim)
    else:
        # vector_quantize_pytorch flattens the first two axes: (rows, C, d), or, after a
        # (B, N) mask, (rows * C, d), where its average over rows becomes no average.
        rows = rows.flatten(0, 1)
    if layer.frac_per_sample_entropy < 1.0:
        num_tokens = rows.shape[0]
        num_sampled = int(num_tokens * layer.frac_per_sample_entropy)
        # vector_quantize_pytorch's draw, from the global CPU generator.
        chosen = torch.randn(num_tokens).argsort(dim=-1) < num_sampled
        rows = rows[chosen.to(rows.device)]
    per_row = rows.dim() == 2
    code_scale = layer.codebook_scale / math.sqrt(layer.codebook_dim) if layer.spherical else layer.codebook_scale
    entropy, prob_sum = lfq_entropy(rows.unsqueeze(1) if per_row else rows, inv_temperature=inv_temperature,
                                    code_scale=code_scale, eps=ENTROPY_EPS, backend=backend)
    per_sample_entropy = entropy.mean()
    if per_row:
        if distributed.is_distributed():
            raise NotImplementedError(
                "LFQ: with a (batch, seq) mask inside a process group, vector_quantize_pytorch all-reduces "
                "each row's distribution over all codes; pass exact_masked_batch_entropy=True (the entropy of "
                "the masked rows' average distribution, averaged over ranks)")
        # The entropy of each row's own distribution, averaged: the per-sample term.
        return per_sample_entropy, per_sample_entropy
    avg_prob = distributed_mean(prob_sum / rows.shape[0])
    return per_sample_entropy, entropy_of(avg_prob).mean()


def lfq_forward(layer: nn.Module, x: Tensor, inv_temperature: float, return_loss_breakdown: bool,
                mask: Tensor | None, *, backend: str, exact_masked_batch_entropy: bool):
    """``LFQ.forward`` of ``layer`` (vqkern's LFQ or vector_quantize_pytorch 1.32's): x (B, N, dim)
    or (B, dim, ...) float -> ``Return(quantized like x, indices int64, aux loss fp32 scalar)``
    (and the ``LossBreakdown``); the entropy terms on ``backend``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if x.dim() < 3:
        raise ValueError(f"x must have shape (B, N, dim) or (B, dim, ...), got {tuple(x.shape)}")
    is_img_or_video = x.dim() >= 4
    should_transpose = is_img_or_video if layer.channel_first is None else layer.channel_first
    if should_transpose:
        x, spatial = to_rows(x)
    if x.shape[-1] != layer.dim:
        raise ValueError(f"x must have {layer.dim} features (dim), got {x.shape[-1]}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape not in (x.shape[:1], x.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape (B,) or (B, N) = {tuple(x.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
    x = layer.project_in(x)
    if layer.soft_clamp_input_value is not None:
        x = (x / layer.soft_clamp_input_value).tanh() * layer.soft_clamp_input_value
    x = x.unflatten(-1, (layer.num_codebooks, layer.codebook_dim))
    if layer.orthogonal_rotation:
        x = x @ layer.orthogonal_rot
    x = layer.maybe_l2norm(x)

    force_f32 = layer.force_quantization_f32
    with autocast("cuda", enabled=False) if force_f32 else nullcontext():
        orig_dtype = x.dtype
        if force_f32:
            x = x.float()
        original_input = x
        quantized = torch.where(x > 0, torch.ones_like(x) * layer.codebook_scale,
                                -torch.ones_like(x) * layer.codebook_scale)
        indices = ((quantized > 0).int() * layer.mask.int()).sum(dim=-1)
        quantized = layer.maybe_l2norm(quantized)
        if layer.training:
            x = layer.activation(x)
            x = x + (quantized - x).detach()
        else:
            x = quantized

        if layer.training:
            per_sample_entropy, codebook_entropy = entropy_terms(
                layer, original_input, mask, inv_temperature, backend=backend,
                exact_masked_batch_entropy=exact_masked_batch_entropy)
            dtype = original_input.dtype
            per_sample_entropy, codebook_entropy = per_sample_entropy.to(dtype), codebook_entropy.to(dtype)
            entropy_aux_loss = per_sample_entropy - layer.diversity_gamma * codebook_entropy
            if layer.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + layer.entropy_loss_offset)
        else:
            entropy_aux_loss = per_sample_entropy = codebook_entropy = layer.zero

        if layer.training and layer.commitment_loss_weight > 0.0:
            commit_loss = F.mse_loss(original_input, quantized.detach(), reduction="none")
            if mask is not None:
                commit_loss = commit_loss[mask]
            commit_loss = commit_loss.mean()
        else:
            commit_loss = layer.zero
        if force_f32:
            x = x.type(orig_dtype)

    if layer.orthogonal_rotation:
        x = x @ layer.orthogonal_rot.t()
    x = layer.project_out(x.flatten(-2))
    if should_transpose:
        x = from_rows(x, spatial)
        indices = from_rows(indices, spatial).movedim(1, -1)
    if not layer.keep_num_codebooks_dim:
        indices = indices.squeeze(-1)
    aux_loss = entropy_aux_loss * layer.entropy_loss_weight + commit_loss * layer.commitment_loss_weight
    ret = Return(x, indices, aux_loss)
    if not return_loss_breakdown:
        return ret
    return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)
