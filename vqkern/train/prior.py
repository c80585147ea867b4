"""Gated PixelCNN (van den Oord et al. 2016) over grids of code indices: the stage-2 prior.

Two stacks remove the blind spot of the original PixelCNN: a vertical stack
that sees every row above, and a horizontal stack that sees the pixels to the
left in the current row plus the vertical stack's view. Causality comes from
kernel shapes, cropping and a one-row shift; only the first layer's horizontal
kernel is masked, to drop the current pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer: (v, h) (B, C, H, W) each -> (v, h) of the same shape."""

    def __init__(self, channels: int, kernel: int, first: bool):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        half = kernel // 2
        self.first = first
        # Vertical: output row i sees padded rows i..i+half = input rows i-half..i.
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel), padding=(half, half))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        # Horizontal: output column j sees input columns j-half..j of the same row.
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1), padding=(0, half))
        self.h_out = nn.Conv2d(channels, channels, 1)
        if first:
            # The first layer must not see the pixel it predicts: no current column.
            mask = torch.ones(half + 1)
            mask[-1] = 0.0
            self.register_buffer("h_mask", mask, persistent=False)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        height, width = v.shape[-2:]
        v_pre = self.vertical(v)[:, :, :height]
        wh = self.horizontal.weight * self.h_mask if self.first else self.horizontal.weight
        h_pre = F.conv2d(h, wh, self.horizontal.bias, padding=self.horizontal.padding)[..., :width]
        # Row i of v_pre saw row i itself (pixels at and right of the current one);
        # shifted down one row, the horizontal stack only gets the rows above.
        v_shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :height]
        h_new = self.h_out(_gate(h_pre + self.v_to_h(v_shifted)))
        # No residual in the first layer: its input h holds the current pixel.
        return _gate(v_pre), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """Autoregressive prior over (B, H, W) int64 grids of K code indices, raster order.

    forward(indices) -> logits (B, K, H, W) float, where position (i, j) depends
    only on positions before it in raster order. ``sample`` draws new grids.
    """

    def __init__(self, num_codes: int, channels: int = 64, layers: int = 8, kernel: int = 3):
        super().__init__()
        self.num_codes = num_codes
        self.embed = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel if i else 7, first=i == 0) for i in range(layers))
        self.head = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(4 * channels, num_codes, 1))

    def forward(self, indices: Tensor) -> Tensor:
        if indices.dtype != torch.int64 or indices.dim() != 3:
            raise ValueError(f"indices must be an int64 tensor (B, H, W), got {indices.dtype} {tuple(indices.shape)}")
        x = self.embed(indices).permute(0, 3, 1, 2)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, *, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """n new grids (n, height, width) int64, one position at a time in raster order."""
        device = self.embed.weight.device
        grid = torch.zeros(n, height, width, dtype=torch.int64, device=device)
        for i in range(height):
            for j in range(width):
                probs = torch.softmax(self(grid)[:, :, i, j] / temperature, dim=1)
                grid[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return grid
