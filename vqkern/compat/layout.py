"""Row layouts of the drop-in ``VectorQuantize``: input layouts, heads, masks, given indices.

The layer accepts (B, N, dim), (B, dim, N), (B, dim, H, W) and (B, dim, D, H, W) inputs and
searches (C, rows, N, D) codebook inputs, C being the number of codebooks (``heads`` with
separate codebooks per head, else 1). These functions move between the two and check the
tensors that come with the input (a padding mask, the indices of ``forward(indices=...)``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def split_heads(x: Tensor, heads: int, separate: bool) -> Tensor:
    """(B, N, heads * D) -> (C, rows, N, D): (heads, B, N, D) for separate codebooks,
    (1, B * heads, N, D) for one shared codebook. Any dtype."""
    b, n, features = x.shape
    if heads == 1:
        return x.unsqueeze(0)
    # Explicit sizes, not -1: a batch with no rows must still reshape.
    d = features // heads
    x = x.reshape(b, n, heads, d)
    if separate:
        return x.permute(2, 0, 1, 3)
    return x.permute(0, 2, 1, 3).reshape(1, b * heads, n, d)


def merge_heads(t: Tensor, b: int, heads: int, separate: bool) -> Tensor:
    """Inverse of :func:`split_heads` for (C, rows, N, ...) -> (B, N, heads, ...). Any dtype."""
    if heads == 1:
        return t[0].unsqueeze(2)
    if separate:
        return t.movedim(0, 2)
    t = t[0].reshape(b, heads, *t.shape[2:])
    return t.movedim(1, 2)


def split_mask(mask: Tensor, heads: int, separate: bool) -> Tensor:
    """(B, N) bool -> (C, rows, N) bool, the row layout of :func:`split_heads`."""
    b, n = mask.shape
    if heads == 1:
        return mask.unsqueeze(0)
    if separate:
        return mask.unsqueeze(0).expand(heads, b, n)
    return mask.unsqueeze(1).expand(b, heads, n).reshape(1, b * heads, n)


def to_rows(x: Tensor, accept_image_fmap: bool, accept_3d_fmap: bool, channel_last: bool):
    """Any accepted input layout of x (float) -> ((B, N, dim), back), where
    ``back(t, channels_first)`` puts a (B, N, ...) tensor into x's layout (channels moved
    to dim 1 when ``channels_first``, for outputs that carry features)."""
    if accept_image_fmap:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W) with accept_image_fmap=True, got {tuple(x.shape)}")
    elif accept_3d_fmap:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W) with accept_3d_fmap=True, got {tuple(x.shape)}")
    elif x.dim() != 3:
        raise ValueError(f"x must be (B, N, dim), (B, dim, N) or (B, dim), got {tuple(x.shape)}")
    if accept_image_fmap or accept_3d_fmap:
        spatial = x.shape[2:]

        def back(t, channels_first):
            t = t.reshape(t.shape[0], *spatial, *t.shape[2:])
            return t.movedim(-1, 1) if channels_first else t
        return x.flatten(2).transpose(1, 2), back
    if not channel_last:
        return x.transpose(1, 2), (lambda t, channels_first: t.movedim(-1, 1) if channels_first else t)
    return x, (lambda t, channels_first: t)


def check_mask(mask, b: int, n: int) -> Tensor:
    """The padding mask as given, after checking it is a (B, N) bool tensor."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
        raise ValueError(f"mask must be a bool tensor of shape (B, N) = {(b, n)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return mask


def check_indices(indices, b: int, n: int, heads: int, codebook_size: int) -> Tensor:
    """forward's index layout (B, N[, heads]) or (B, H, W[, heads]), int64 or int32, each in
    [0, codebook_size) or -1 -> (B, N, heads) int64."""
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32) or \
            indices.numel() != b * n * heads:
        raise ValueError(f"indices must be an integer tensor with one code per row and head "
                         f"({b} x {n} x {heads}), got {getattr(indices, 'shape', type(indices))}")
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}) or be -1 (ignored)")
    return indices.long().reshape(b, n, heads)
