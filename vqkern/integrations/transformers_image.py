"""transformers' image VQ-VAE quantizers on vqkern's fused search: Chameleon, Janus,
GLM-Image (``(quantized, loss, indices)``) and Emu3 (indices only, video latents).

Each original ranks codes through ``|z|^2 + |e|^2 - 2 z.e`` (an N x K matrix). Chameleon's
and Janus's are the VQGAN step with ``beta`` on the codebook term; GLM-Image's searches
l2-normalized rows against l2-normalized codes (the normalization, and its gradient, as
the original computes it); Emu3's returns the nearest code of each (B, T, C, H, W) latent.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..functional import nearest_code
from . import backend_of, register, source_mismatch
from ._vqgan import channels_last, quantize_rows

_MODELS = "transformers.models"
_WRITTEN_FOR = "transformers 5.25.0"
_SOURCES = {
    "ChameleonVQVAEVectorQuantizer": "f79baf7893a10c335b049c3326464d879792280e2e828dbe1a01d07d3e17de42",
    "JanusVQVAEVectorQuantizer": "1f2f95d91018d8525a56a000a9ad09487a04cff002fe578948ed31ebe3508f35",
    "GlmImageVQVAEVectorQuantizer": "a45b17231d145996c241c0d7fcc7e036737a547bbba56819dc84c69244be42a6",
    "Emu3VQVAEVectorQuantizer": "9d14e0ffb08b73cfae513ee47c2cc23c09c2a7e41721400674187fbb2fae450a",
}


def _check(layer):
    cls = type(layer)
    return source_mismatch(cls, frozenset({_SOURCES[cls.__qualname__]}), _WRITTEN_FOR)


def _forward(self, hidden_state):
    """Chameleon / Janus: hidden_state (B, embed_dim, H, W) float -> (quantized like it,
    loss scalar, indices int64 (B*H*W,)); loss = mean((sg[e] - z)^2) + beta * mean((e - sg[z])^2)."""
    z = channels_last(hidden_state, 4, self.embedding_dim, name="hidden_state", layout="(B, embed_dim, H, W)")
    z_q, loss, indices = quantize_rows(z, self.embedding.weight, commitment_weight=1.0,
                                       codebook_weight=self.beta, backend=backend_of(self))
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices


def _forward_normalized(self, hidden_state):
    """GLM-Image: as :func:`_forward` on l2-normalized rows and codes; the quantized output is
    the normalized code (straight-through to the normalized input)."""
    z = channels_last(hidden_state, 4, self.embedding_dim, name="hidden_state", layout="(B, embed_dim, H, W)")
    z = F.normalize(z, p=2, dim=-1)
    embedding = F.normalize(self.embedding.weight, p=2, dim=-1)
    z_q, loss, indices = quantize_rows(z, embedding, commitment_weight=1.0, codebook_weight=self.beta,
                                       backend=backend_of(self))
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices


def _forward_indices(self, hidden_state):
    """Emu3: hidden_state (B, T, embed_dim, H, W) float -> indices int64 (B, T, H, W)."""
    z = channels_last(hidden_state, 5, self.embedding.weight.shape[1], name="hidden_state",
                      layout="(B, T, embed_dim, H, W)")
    return nearest_code(z, self.embedding.weight, backend=backend_of(self))[0]


register(f"{_MODELS}.chameleon.modeling_chameleon.ChameleonVQVAEVectorQuantizer",
         f"{_MODELS}.janus.modeling_janus.JanusVQVAEVectorQuantizer",
         methods={"forward": _forward}, check=_check)
register(f"{_MODELS}.glm_image.modeling_glm_image.GlmImageVQVAEVectorQuantizer",
         methods={"forward": _forward_normalized}, check=_check)
register(f"{_MODELS}.emu3.modeling_emu3.Emu3VQVAEVectorQuantizer",
         methods={"forward": _forward_indices}, check=_check)
