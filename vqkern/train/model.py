"""Reference VQ-VAE (van den Oord et al. 2017) scaled to small images.

The paper's encoder (two stride-2 4x4 convolutions, a 3x3 convolution, two
residual blocks ReLU-3x3-ReLU-1x1) and a mirrored decoder, with a 1x1
projection to the code size D. A 28 x 28 image becomes a 7 x 7 grid of codes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

QUANTIZERS = ("reference", "vqkern")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _stack(channels: int, hidden: int, blocks: int) -> list[nn.Module]:
    # The paper ends the residual stack with a ReLU before the next layer.
    return [ResidualBlock(channels, hidden) for _ in range(blocks)] + [nn.ReLU()]


def make_quantizer(kind: str, num_embeddings: int, embedding_dim: int, *, beta: float = 0.25,
                   ema: bool = False, decay: float = 0.99, dead_code_threshold: float = 0.0,
                   backend: str = "auto", **large_codebook) -> nn.Module:
    """The quantizer of a VQVAE: ``"reference"`` (plain PyTorch) or ``"vqkern"`` (fused kernels).

    Both take (B, D, H, W) feature maps (channel_dim=1) and return
    (quantized, indices (B, H, W) int64, loss, perplexity); their state dicts
    share key names, so weights move between them. ``large_codebook``: the
    VectorQuantizer options ``simvq``, ``init``, ``kmeans_iters``, ``kmeans_batches``,
    ``codebook_dim`` and ``metric`` (vqkern only; the reference takes their defaults).
    """
    common = dict(commitment_cost=beta, ema=ema, decay=decay,
                  dead_code_threshold=dead_code_threshold, channel_dim=1)
    if kind == "reference":
        from ..reference import ReferenceVectorQuantizer
        plain = dict(simvq=False, init="random", codebook_dim=None, metric="l2")
        changed = sorted(k for k, v in large_codebook.items() if k in plain and v != plain[k])
        if changed:
            raise ValueError(f"the reference quantizer has no {', '.join(changed)} option: use --quantizer vqkern")
        return ReferenceVectorQuantizer(num_embeddings, embedding_dim, **common)
    if kind == "vqkern":
        from ..modules import VectorQuantizer
        return VectorQuantizer(num_embeddings, embedding_dim, backend=backend, **common, **large_codebook)
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {kind!r}")


class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder.

    Args:
        in_channels: image channels C (1 for Fashion-MNIST).
        hidden: channels of the convolutions; res_hidden: inside residual blocks.
        num_res_blocks: residual blocks in the encoder and in the decoder.
        embedding_dim: D; num_embeddings: K.
        quantizer: a module from :func:`make_quantizer` (its D must match).

    Images are float (B, C, H, W) centred on 0 (pixels in [-0.5, 0.5]), H and W
    multiples of 4; codes form a (B, H/4, W/4) grid.
    """

    def __init__(self, quantizer: nn.Module, *, in_channels: int = 1, hidden: int = 128,
                 res_hidden: int = 32, num_res_blocks: int = 2, embedding_dim: int = 64):
        super().__init__()
        if quantizer.embedding_dim != embedding_dim:
            raise ValueError(f"quantizer has D={quantizer.embedding_dim}, the model embedding_dim={embedding_dim}")
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            *_stack(hidden, res_hidden, num_res_blocks),
            nn.Conv2d(hidden, embedding_dim, 1),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(embedding_dim, hidden, 3, padding=1),
            *_stack(hidden, res_hidden, num_res_blocks),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, in_channels, 4, stride=2, padding=1),
        )

    def forward(self, x: Tensor):
        """x (B, C, H, W) -> (reconstruction like x, indices (B, H/4, W/4) int64, vq loss, perplexity)."""
        quantized, indices, vq_loss, perplexity = self.quantizer(self.encoder(x))
        return self.decoder(quantized), indices, vq_loss, perplexity

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> code indices (B, H/4, W/4) int64."""
        return self.quantizer(self.encoder(x))[1]

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) int64 -> images (B, C, 4h, 4w) float."""
        dequantize = getattr(self.quantizer, "dequantize", None)
        # (B, h, w, D): through the quantizer's own output map where it has one
        codes = dequantize(indices) if dequantize is not None else self.quantizer.codebook[indices]
        return self.decoder(codes.permute(0, 3, 1, 2).contiguous())
