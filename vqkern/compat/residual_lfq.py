"""Drop-ins for ``vector_quantize_pytorch.ResidualLFQ`` (LFQ layers on successive residuals,
the codes halved in scale at each layer) and ``GroupedResidualLFQ``."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.amp import autocast

from ._residual import GroupedResidual, check_dropout_args, split_dropped, step_dropout_depth
from .lfq import LFQ
from .residual_vq import DropoutSeed


class ResidualLFQ(nn.Module):
    """``num_quantizers`` :class:`LFQ` layers, layer q with ``codebook_scale = 2^-q`` (and a
    soft clamp halved at each layer), as vector_quantize_pytorch.ResidualLFQ.

    Keyword arguments: ``dim``, ``num_quantizers``, ``codebook_size`` (a power of 2; inputs
    are projected to log2 of it when it differs from dim), ``quantize_dropout``,
    ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``,
    ``soft_clamp_input_value``, and any :class:`LFQ` option (passed to every layer).

    forward(x (B, N, dim), mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)
    returns ``(quantized (B, N, dim), indices int64 (B, N, Q), losses (Q,))``: each layer's
    auxiliary loss, 0 and index -1 for layers dropped in training; ``return_all_codes``
    adds the codes (Q, B, N, log2 codebook_size).
    """

    def __init__(self, *, dim, num_quantizers, codebook_size, quantize_dropout=False, quantize_dropout_cutoff_index=0,
                 quantize_dropout_multiple_of=1, soft_clamp_input_value=None, **kwargs):
        super().__init__()
        if not isinstance(codebook_size, int) or codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2 (>= 2), got {codebook_size!r}")
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        check_dropout_args(quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        codebook_dim = int(math.log2(codebook_size))
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.num_quantizers = num_quantizers
        self.layers = nn.ModuleList()
        for q in range(num_quantizers):
            self.layers.append(LFQ(dim=codebook_dim, codebook_scale=2 ** -q,
                                   soft_clamp_input_value=soft_clamp_input_value, **kwargs))
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualLFQ's layers must not project (num_codebooks and has_projections "
                             "must leave each layer's input at log2(codebook_size) features)")
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self._dropout_seed = DropoutSeed()

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, codebook_size, log2 codebook_size): every layer's codes."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices int64 (B, ..., Q') with Q' <= Q (-1: dropped) -> float codes (Q, B, ..., log2 K),
        each layer's code at its scale (0 for -1 and missing trailing layers)."""
        safe, dropped = split_dropped(indices, self.num_quantizers, self.quantize_dropout)
        codes = []
        for i, layer in enumerate(self.layers):
            bits = ((safe[..., i, None].int() & layer.mask) != 0).to(layer.dtype)
            codes.append(layer.bits_to_codes(bits).masked_fill(dropped[..., i, None], 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices int64 (B, ..., Q') -> the quantized float output (B, ..., dim)."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        """x (B, N, dim) float -> (quantized (B, N, dim), indices int64 (B, N, Q), losses fp32 (Q,))."""
        x = self.project_in(x)
        quantized_out = 0.0
        residual = x
        all_losses, all_indices = [], []
        depth = step_dropout_depth(self, rand_quantize_dropout_fixed_seed)
        if depth is not None:
            null_indices = torch.full(x.shape[:2], -1, device=x.device, dtype=torch.long)
            null_loss = torch.tensor(0.0, device=x.device, dtype=x.dtype)
        with autocast("cuda", enabled=False):
            for q, layer in enumerate(self.layers):
                if depth is not None and q > depth:
                    all_indices.append(null_indices)
                    all_losses.append(null_loss)
                    continue
                quantized, indices, loss = layer(residual, mask=mask)
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
                all_losses.append(loss)
        quantized_out = self.project_out(quantized_out)
        all_losses, all_indices = torch.stack(all_losses, dim=-1), torch.stack(all_indices, dim=-1)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)


class GroupedResidualLFQ(GroupedResidual):
    """One :class:`ResidualLFQ` per slice of the features, as vector_quantize_pytorch.GroupedResidualLFQ:
    ``GroupedResidualLFQ(dim=, groups=, accept_image_fmap=False, **ResidualLFQ kwargs)``.

    forward(x, mask=None, return_all_codes=False) returns ``(quantized like x, indices
    (groups, B, N, Q), losses (groups, Q))`` (and the codes (groups, Q, B, N, d))."""

    residual_cls = ResidualLFQ

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False):
        """x (B, N, dim) float -> (quantized (B, N, dim), indices int64 (groups, B, N, Q), losses (groups, Q))."""
        return self._run_groups(x, mask=mask, return_all_codes=return_all_codes)
