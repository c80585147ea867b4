"""Drop-in for ``vector_quantize_pytorch.ResidualVQ`` (Algorithm 1 of SoundStream,
https://arxiv.org/abs/2107.03312): each layer quantizes what the previous ones left."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._args import reject_unsupported
from .vector_quantize import VectorQuantize

UNSUPPORTED = dict(
    shared_codebook=False, diveq=False, quantize_dropout=False, quantize_dropout_cutoff_index=0,
    quantize_dropout_multiple_of=1, implicit_neural_codebook=False, mlp_kwargs={}, beam_size=None,
    eval_beam_size=None, beam_score_quantizer_weights=None, quant_grad_frac=0.0,
    return_zeros_for_masked_padding=True,
)
UNSUPPORTED_FORWARD = dict(mask=None, indices=None, sample_codebook_temp=None, freeze_codebook=False,
                           beam_size=None, rand_quantize_dropout_fixed_seed=None)


class ResidualVQ(nn.Module):
    """``num_quantizers`` VectorQuantize layers on successive residuals.

    Keyword arguments as vector_quantize_pytorch.ResidualVQ: ``dim``,
    ``num_quantizers``, ``codebook_size`` (an int, or a tuple of one size per
    layer), ``codebook_dim`` (with project_in/project_out around the stack),
    ``heads`` (must be 1), ``accept_image_fmap``, and any supported
    :class:`VectorQuantize` option (passed to every layer).

    forward(x (..., dim)) returns ``(quantized, indices, losses)``: quantized like
    x, indices int64 (..., num_quantizers), losses float32 (num_quantizers,) (each
    layer's loss). ``return_all_codes=True`` adds the codes (num_quantizers, ..., D).
    """

    def __init__(self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None, shared_codebook=False,
                 diveq=False, heads=1, quantize_dropout=False, quantize_dropout_cutoff_index=0,
                 quantize_dropout_multiple_of=1, accept_image_fmap=False, implicit_neural_codebook=False,
                 mlp_kwargs=None, beam_size=None, eval_beam_size=None, beam_score_quantizer_weights=None,
                 quant_grad_frac=0.0, return_zeros_for_masked_padding=True, **vq_kwargs):
        super().__init__()
        given = dict(locals())
        given["mlp_kwargs"] = {} if mlp_kwargs is None else mlp_kwargs
        reject_unsupported("ResidualVQ", given, UNSUPPORTED)
        if heads != 1:
            raise ValueError(f"heads must be 1: residual VQ is not compatible with multi-headed codes, got {heads}")
        if num_quantizers is None and not isinstance(codebook_size, tuple):
            raise ValueError("num_quantizers is required unless codebook_size is a tuple of per-layer sizes")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.accept_image_fmap = accept_image_fmap

        sizes = codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * num_quantizers
        num_quantizers = len(sizes) if num_quantizers is None else num_quantizers
        if len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(sizes)} entries for num_quantizers={num_quantizers}")
        self.num_quantizers, self.codebook_sizes = num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList([
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for size in sizes
        ])
        self.vq_is_ema_updating = self.layers[0].ema_update

    @property
    def codebook_size(self) -> int:
        """The first layer's number of codes K."""
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """(num_quantizers, K, D) when the sizes agree, else a tuple of (K_q, D)."""
        codebooks = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(codebooks) if self.uniform_codebook_size else codebooks

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """(..., num_quantizers) int64 -> codes (num_quantizers, ..., D)."""
        if indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices must end with num_quantizers = {self.num_quantizers}, got {tuple(indices.shape)}")
        return torch.stack([layer._codebook.embed[0][indices[..., q]] for q, layer in enumerate(self.layers)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """(..., num_quantizers) int64 -> the sum of the layers' codes through project_out, (..., dim) float32."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def forward(self, x: Tensor, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        """x: float (..., dim) (or (B, dim, H, W) with accept_image_fmap).

        Returns (quantized like x, indices int64 (..., num_quantizers), losses float32
        (num_quantizers,)), plus all codes (num_quantizers, ..., D) with ``return_all_codes``.
        """
        reject_unsupported("ResidualVQ.forward", dict(
            mask=mask, indices=indices, sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
            beam_size=beam_size, rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed),
            UNSUPPORTED_FORWARD)
        x = self.project_in(x)
        quantized_out = torch.zeros_like(x)
        residual = x
        all_indices, all_losses = [], []
        for layer in self.layers:
            quantized, embed_indices, loss = layer(residual)
            # quant_grad_frac = 0: a layer's output does not push gradient into the earlier layers.
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(embed_indices)
            all_losses.append(loss.reshape(1).float())
        all_indices = torch.stack(all_indices, dim=-1)
        all_losses = torch.cat(all_losses)
        quantized_out = self.project_out(quantized_out)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)
