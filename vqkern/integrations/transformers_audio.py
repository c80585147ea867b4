"""transformers (5.x) audio codecs: the Euclidean codebooks of Encodec, Mimi, X-Codec and
WavTokenizer, and DAC's ``DacVectorQuantize``, served by vqkern's kernels. (Higgs Audio v2's
tokenizer has the same codebook, but its module imports torchaudio, which does not load
beside the CPU torch the tests run on: it is not registered untested.)

These codebooks have no training path in transformers (``encode``/``decode`` only; the
weights come from a checkpoint): each ranks codes in ``quantize`` by
``|x|^2 - 2 x E^T + |E|^2`` (Mimi: ``torch.cdist``), an N x K matrix. Patched:
``quantize`` searches with the fused kernel. DAC's ``decode_latents`` (forward,
``from_latents``) ranks l2-normalized latents against l2-normalized codes by
``-|e|^2 + 2 e c^T + |c|^2`` (the code norm's sign differs from descript's DAC): for
unit codes the same order as the cosine, and a code of norm zero scores as a unit
code at cosine -0.5, which the patched search reproduces.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import nearest_code
from . import _common, backend_of, register
from .dac import latent_rows


def _quantize(self, hidden_states: Tensor) -> Tensor:
    """hidden_states (N, D) float -> (N,) int64 nearest codes."""
    return _common.nearest(self, hidden_states, self.embed)


def _dac_codes(layer, rows: Tensor, codebook: Tensor) -> Tensor:
    """(N,) int64: transformers DAC's code choice for rows (N, D) and codebook (K, D)."""
    unit = F.normalize(codebook.detach().float())
    zero = unit.abs().amax(dim=1) == 0
    # A code of norm 0 scores -1 where a unit code scores 2 cos(e, c); a squared
    # distance 2 - 2 cos > 3 means cos < -0.5. Zero codes are moved out of reach (norm
    # 4: farther than 4 from every unit row) so the search finds the best unit code,
    # then the first zero code replaces it where it scores higher (lower index on a tie).
    far = torch.full_like(unit, 4.0 / math.sqrt(unit.shape[1]))
    indices, distances = nearest_code(F.normalize(rows.float()), torch.where(zero[:, None], far, unit),
                                      backend=backend_of(layer))
    first_zero = zero.to(torch.int8).argmax()
    zero_wins = (distances > 3) | ((distances == 3) & (first_zero < indices))
    return torch.where(zero.any() & zero_wins, first_zero, indices)


def _dac_decode_latents(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
    """hidden_states (B, D, T) -> (codes (B, D, T), indices (B, T) int64)."""
    # transformers wraps decode_latents in force_accelerate_hooks("codebook"): the
    # codebook's accelerate hook (offloading) fires around the direct weight access.
    hook = getattr(self.codebook, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(self.codebook)
    indices = _dac_codes(self, latent_rows(hidden_states), self.codebook.weight)
    indices = indices.reshape(hidden_states.shape[0], -1)
    quantized = self.codebook(indices).transpose(1, 2)
    if hook is not None:
        hook.post_forward(self.codebook, ())
    return quantized, indices


register(
    "transformers.models.encodec.modeling_encodec.EncodecEuclideanCodebook",
    "transformers.models.mimi.modeling_mimi.MimiEuclideanCodebook",
    "transformers.models.xcodec.modeling_xcodec.XcodecEuclideanCodebook",
    "transformers.models.wavtokenizer.modeling_wavtokenizer.WavTokenizerEuclideanCodebook",
    methods={"quantize": _quantize},
)
register("transformers.models.dac.modeling_dac.DacVectorQuantize", methods={"decode_latents": _dac_decode_latents})
