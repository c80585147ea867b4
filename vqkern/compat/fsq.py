"""Drop-in for ``vector_quantize_pytorch.FSQ``: finite scalar quantization (Mentzer et al.
2023, https://arxiv.org/abs/2309.15505). Each feature is bounded and rounded to one of
``levels[j]`` values; the code index is the mixed-radix number of the rounded levels.
There is no search and no N x K tensor to avoid: the class completes the drop-in, with
vector-quantize-pytorch 1.32's arguments, outputs, buffers and numerics.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.amp import autocast

from .lfq import from_rows, to_rows


def round_ste(z: Tensor) -> Tensor:
    """round(z) forward, identity backward; z of any shape, float."""
    return z + (z.round() - z).detach()


def floor_ste(z: Tensor) -> Tensor:
    """floor(z) forward, identity backward; z of any shape, float."""
    return z + (z.floor() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantization, argument- and buffer-compatible with vector-quantize-pytorch.

    Every argument of vector_quantize_pytorch 1.32's ``FSQ`` is supported, with its default:
    ``levels, dim, num_codebooks, keep_num_codebooks_dim, scale, allowed_dtypes,
    channel_first, projection_has_bias, return_indices, force_quantization_f32,
    preserve_symmetry, noise_dropout, bound_hard_clamp, orthogonal_rotation``.

    forward(z) with z (B, N, dim), or (B, dim, ...) for images and video (or with
    ``channel_first``), returns ``(out like z, indices)``: indices int32 (B, N) (or (B, ...),
    with a trailing num_codebooks axis when kept), None with ``return_indices=False``.
    """

    def __init__(self, levels, dim=None, num_codebooks=1, keep_num_codebooks_dim=None, scale=None,
                 allowed_dtypes=(torch.float32, torch.float64), channel_first=False, projection_has_bias=True,
                 return_indices=True, force_quantization_f32=True, preserve_symmetry=False, noise_dropout=0.0,
                 bound_hard_clamp=False, orthogonal_rotation=False):
        super().__init__()
        levels = list(levels)
        if not levels or any(not isinstance(v, int) or v < 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        if any(v == 2 for v in levels) and not preserve_symmetry:
            raise ValueError("levels of 2 need preserve_symmetry=True (or use a greater level)")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True")
        if not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32)
        self.register_buffer("_basis", basis, persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.return_indices = return_indices
        if return_indices:
            self.codebook_size = int(self._levels.prod().item())
            self.register_buffer("implicit_codebook", self._indices_to_codes(torch.arange(self.codebook_size)),
                                 persistent=False)
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)

    # ---- the quantizer -----------------------------------------------------------------

    def bound(self, z: Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> Tensor:
        """z (..., codebook_dim) float -> codes of the same shape: the paper's bound, levels[j]
        values per feature, rounded (straight-through) and divided by the half width, in [-1, 1]."""
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        return round_ste(bounded) / (self._levels // 2)

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """z (..., codebook_dim) float -> codes of the same shape, symmetric levels
        (https://arxiv.org/abs/2411.19842, 3.2):
        2 / (L - 1) * floor((L - 1) * (tanh(z) + 1) / 2 + 0.5) - 1."""
        levels_minus_1 = self._levels - 1
        squashed = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
        bracket = floor_ste(levels_minus_1 * (squashed + 1) / 2.0 + 0.5)
        return (2.0 / levels_minus_1) * bracket - 1.0

    def quantize(self, z: Tensor) -> Tensor:
        """z (..., codebook_dim) float -> float codes in [-1, 1], same shape, straight-through gradient."""
        bound = self.symmetry_preserving_bound if self.preserve_symmetry else self.bound
        return bound(z, hard_clamp=self.bound_hard_clamp)

    def maybe_apply_noise(self, bounded_z: Tensor) -> Tensor:
        """codes (..., codebook_dim) float, in training with noise_dropout: a uniform offset in
        [-0.5, 0.5) on that fraction of entries, same shape."""
        if not self.training or self.noise_dropout == 0.0:
            return bounded_z
        offset_mask = torch.full_like(bounded_z, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(bounded_z) - 0.5
        return torch.where(offset_mask, bounded_z + offset, bounded_z).clamp(-1.0, 1.0)

    def _scale_and_shift(self, zhat_normalized: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return (zhat_normalized + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return zhat * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (zhat - half_width) / half_width

    def _indices_to_codes(self, indices: Tensor) -> Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices int32/int64 (...) -> the level of each feature, int64 (..., codebook_dim)."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """codes (..., codebook_dim) float -> int32 indices (...)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must have {self.codebook_dim} features, got {zhat.shape[-1]}")
        return (self._scale_and_shift(zhat) * self._basis).sum(dim=-1).round().to(torch.int32)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices int32 (B, N) (or (B, ...), (..., num_codebooks)) -> the float output forward
        gives for them, shape (B, N, dim) (projected; channel first for images)."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._indices_to_codes(indices)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def forward(self, z: Tensor):
        """z (B, N, dim) or (B, dim, ...) float -> (out like z, indices int32 or None)."""
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 3:
            raise ValueError(f"z must be a float tensor of shape (B, N, dim) or (B, dim, ...), got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        move_channel_last = z.dim() >= 4 or self.channel_first
        if move_channel_last:
            z, spatial = to_rows(z)
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must have {self.dim} features (dim), got {z.shape[-1]}")
        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        force_f32 = self.force_quantization_f32
        with autocast("cuda", enabled=False) if force_f32 else nullcontext():
            orig_dtype = z.dtype
            if force_f32 and orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes = self.quantize(z)
            indices = self.codes_to_indices(codes) if self.return_indices else None
            codes = self.maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            codes = codes.flatten(-2).to(orig_dtype)
        out = self.project_out(codes)
        if move_channel_last:
            out = from_rows(out, spatial)
            if indices is not None:
                indices = from_rows(indices, spatial).movedim(1, -1)
        if not self.keep_num_codebooks_dim and indices is not None:
            indices = indices.squeeze(-1)
        return out, indices
