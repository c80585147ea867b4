"""Drop-ins for ``vector_quantize_pytorch.ResidualFSQ`` (FSQ layers on successive residuals,
layer q quantizing the residual scaled up by levels^q) and ``GroupedResidualFSQ``."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.amp import autocast

from ._residual import GroupedResidual, check_dropout_args, split_dropped, step_dropout_depth
from .fsq import FSQ
from .lfq import from_rows, to_rows
from .residual_vq import DropoutSeed


class ResidualFSQ(nn.Module):
    """``num_quantizers`` symmetric :class:`FSQ` layers (``preserve_symmetry=True``), as
    vector_quantize_pytorch.ResidualFSQ: layer q quantizes ``residual / levels^-q`` and its
    codes are scaled back by ``levels^-q``.

    Keyword arguments: ``levels``, ``num_quantizers``, ``dim`` (default len(levels); else
    projected in and out), ``is_channel_first``, ``quantize_dropout``,
    ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``,
    ``soft_clamp_input_value`` (a float, list or tensor: tanh soft clamp before the layers),
    ``bound_hard_clamp`` (default True: the layers clamp, and the input is soft-clamped to
    1 + 1 / (levels - 1)), and any :class:`FSQ` option (passed to every layer).

    forward(x (B, N, dim), return_all_codes=False, rand_quantize_dropout_fixed_seed=None)
    returns ``(quantized (B, N, dim), indices (B, N, Q))`` (int32, int64 when layers were
    dropped: -1 there); ``return_all_codes`` adds the codes (Q, B, N, len(levels)).
    """

    def __init__(self, *, levels, num_quantizers, dim=None, is_channel_first=False, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, soft_clamp_input_value=None,
                 bound_hard_clamp=True, **kwargs):
        super().__init__()
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        check_dropout_args(quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else dim
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.levels = levels
        levels_tensor = torch.tensor(levels)
        if not bool((levels_tensor > 1).all()):
            raise ValueError(f"levels must all be > 1, got {levels!r}")
        self.layers = nn.ModuleList([
            FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp, **kwargs)
            for _ in range(num_quantizers)])
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualFSQ's layers must not project (num_codebooks must stay 1)")
        self.codebook_size = self.layers[0].codebook_size
        scales = torch.stack([levels_tensor.float() ** -q for q in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value must be None with bound_hard_clamp=True "
                                 "(the input is then soft-clamped to 1 + 1 / (levels - 1))")
            soft_clamp_input_value = 1 + 1 / (levels_tensor - 1)
        if isinstance(soft_clamp_input_value, (list, float)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        self._dropout_seed = DropoutSeed()

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, codebook_size, len(levels)): every layer's codes (unscaled)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices int (B, ..., Q') with Q' <= Q (-1: dropped) -> scaled float codes (Q, B, ..., len(levels))."""
        safe, dropped = split_dropped(indices, self.num_quantizers, self.quantize_dropout)
        safe = safe.long()
        codes = torch.stack([self.codebooks[i][safe[..., i]] for i in range(self.num_quantizers)])
        codes = codes.masked_fill(dropped.movedim(-1, 0).unsqueeze(-1), 0.0)
        return codes * self.scales.reshape(self.num_quantizers, *([1] * (codes.dim() - 2)), -1)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices int (B, ..., Q') -> the quantized float output (B, ..., dim)."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        """x (B, N, dim) float -> (quantized (B, N, dim), indices int32/int64 (B, N, Q))."""
        if self.is_channel_first:
            x, spatial = to_rows(x)
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        quantized_out = 0.0
        residual = x
        all_indices = []
        depth = step_dropout_depth(self, rand_quantize_dropout_fixed_seed)
        if depth is not None:
            null_indices = torch.full(x.shape[:2], -1, device=x.device, dtype=torch.long)
        with autocast("cuda", enabled=False):
            for q, (layer, scale) in enumerate(zip(self.layers, self.scales)):
                if depth is not None and q > depth:
                    all_indices.append(null_indices)
                    continue
                quantized, indices = layer(residual / scale)
                quantized = quantized * scale
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
        quantized_out = self.project_out(quantized_out)
        all_indices = torch.stack(all_indices, dim=-1)
        if self.is_channel_first:
            quantized_out, all_indices = from_rows(quantized_out, spatial), from_rows(all_indices, spatial)
        if not return_all_codes:
            return quantized_out, all_indices
        return quantized_out, all_indices, self.get_codes_from_indices(all_indices)


class GroupedResidualFSQ(GroupedResidual):
    """One :class:`ResidualFSQ` per slice of the features, as vector_quantize_pytorch.GroupedResidualFSQ:
    ``GroupedResidualFSQ(dim=, groups=, accept_image_fmap=False, **ResidualFSQ kwargs)``.

    forward(x, return_all_codes=False) returns ``(quantized like x, indices (groups, B, N, Q))``."""

    residual_cls = ResidualFSQ

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__(dim=dim, groups=groups, accept_image_fmap=accept_image_fmap, **kwargs)
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x: Tensor, return_all_codes: bool = False):
        """x (B, N, dim) float -> (quantized (B, N, dim), indices (groups, B, N, Q))."""
        return self._run_groups(x, return_all_codes=return_all_codes)
