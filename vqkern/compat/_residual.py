"""What the residual stacks of scalar quantizers share: the quantize-dropout depth and the
grouped wrapper (one residual stack per slice of the features)."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .residual_vq import DropoutSeed, _round_up_multiple


def check_dropout_args(cutoff_index, multiple_of) -> None:
    """Raise a ValueError naming quantize_dropout_cutoff_index or quantize_dropout_multiple_of when wrong."""
    if not isinstance(cutoff_index, int) or cutoff_index < 0:
        raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, got {cutoff_index!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"quantize_dropout_multiple_of must be an int >= 1, got {multiple_of!r}")


def dropout_depth(seed: int, cutoff_index: int, num_quantizers: int, multiple_of: int) -> int:
    """The last layer that runs under quantize dropout, as vector_quantize_pytorch draws it
    from ``seed``: uniform in [cutoff_index, num_quantizers), rounded up so that the number
    of layers run is a multiple of ``multiple_of``."""
    depth = random.Random(seed).randrange(cutoff_index, num_quantizers)
    if multiple_of != 1:
        depth = _round_up_multiple(depth + 1, multiple_of) - 1
    return depth


def step_dropout_depth(module: nn.Module, seed: int | None) -> int | None:
    """The last layer that runs in this forward of a residual stack (``quantize_dropout``,
    ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``, ``num_quantizers``,
    ``_dropout_seed``), or None when every layer runs (no dropout, eval or no grad)."""
    if not (module.training and module.quantize_dropout and torch.is_grad_enabled()):
        return None
    seed = module._dropout_seed() if seed is None else seed
    return dropout_depth(seed, module.quantize_dropout_cutoff_index, module.num_quantizers,
                         module.quantize_dropout_multiple_of)


def split_dropped(indices: Tensor, num_quantizers: int, quantize_dropout: bool) -> tuple[Tensor, Tensor]:
    """indices (..., Q') with Q' <= num_quantizers -> (indices padded to num_quantizers with
    0 where they were -1 or missing, the bool mask of those entries)."""
    q = indices.shape[-1]
    if q < num_quantizers:
        if not quantize_dropout:
            raise ValueError("indices for fewer layers than num_quantizers need quantize_dropout=True")
        indices = F.pad(indices, (0, num_quantizers - q), value=-1)
    dropped = indices == -1
    return indices.masked_fill(dropped, 0), dropped


class GroupedResidual(nn.Module):
    """``groups`` residual stacks (``residual_cls``), each on its slice of the ``dim``
    features (axis 1 with ``accept_image_fmap``, else the last); in training every group
    drops the same layers (one dropout seed per step)."""

    residual_cls: type = nn.Module

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"groups must be a positive int dividing dim = {dim}, got {groups!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList([self.residual_cls(dim=dim // groups, **kwargs) for _ in range(groups)])
        self._dropout_seed = DropoutSeed()

    @property
    def codebooks(self) -> Tensor:
        """(groups, num_quantizers, codebook_size, codebook_dim): every group's codes."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        """The feature axis the groups split: 1 with accept_image_fmap, else -1."""
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> Tensor:
        """indices int of shape (groups, B, ..., Q) -> float codes (groups, Q, B, ..., codebook_dim)."""
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> Tensor:
        """indices int of shape (groups, B, ..., Q) -> the quantized float output, the groups concatenated."""
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)],
                         dim=self.split_dim)

    def _run_groups(self, x: Tensor, **forward_kwargs):
        """(quantized of x's shape, then each further output stacked over the groups)."""
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} features on axis {self.split_dim}, got {tuple(x.shape)}")
        seed = self._dropout_seed() if self.training else None
        outs = [rvq(chunk, rand_quantize_dropout_fixed_seed=seed, **forward_kwargs)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, *rest = zip(*outs)
        return (torch.cat(quantized, dim=self.split_dim), *(torch.stack(r) for r in rest))
