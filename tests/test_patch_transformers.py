"""vqkern.patch on transformers' image VQ-VAE quantizers (Chameleon, Janus, GLM-Image, Emu3),
built from tiny configs of their VQ-VAE models (random init, offline)."""
import pytest
import torch
import torch.nn.functional as F

import vqkern

from patch_parity import (
    assert_codes_agree,
    assert_no_rows_by_codes,
    compare_training,
    patched_copy,
    tensor_objects,
    train_models_alike,
)

transformers = pytest.importorskip("transformers", reason="transformers is installed by requirements-test.txt")
from transformers import ChameleonVQVAEConfig, Emu3VQVAEConfig, JanusVQVAEConfig  # noqa: E402
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE  # noqa: E402
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE  # noqa: E402
from transformers.models.glm_image.modeling_glm_image import GlmImageVQVAE, GlmImageVQVAEConfig  # noqa: E402
from transformers.models.janus.modeling_janus import JanusVQVAE  # noqa: E402

D, K = 8, 32
# GroupNorm(32, ...) inside the encoders: 32 channels is the smallest width.
TINY = dict(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, embed_dim=D, num_embeddings=K,
            latent_channels=D, resolution=16, in_channels=3, attn_resolutions=[])


def chameleon():
    torch.manual_seed(0)
    return ChameleonVQVAE(ChameleonVQVAEConfig(**TINY))


def janus():
    torch.manual_seed(0)
    return JanusVQVAE(JanusVQVAEConfig(**{k: v for k, v in TINY.items() if k not in ("resolution", "attn_resolutions")},
                                       num_patches=4, projection_dim=16, image_token_embed_dim=16))


def glm_image():
    torch.manual_seed(0)
    return GlmImageVQVAE(GlmImageVQVAEConfig(embed_dim=D, num_embeddings=K, latent_channels=16))


def emu3():
    torch.manual_seed(0)
    return Emu3VQVAE(Emu3VQVAEConfig(codebook_size=K, embed_dim=D, latent_channels=D, base_channels=32,
                                     channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
                                     temporal_downsample_factor=1))


def rows(module, z):
    return z.movedim(1, -1).reshape(-1, z.shape[1]), module.embedding.weight


def normalized_rows(module, z):
    r, codebook = rows(module, z)
    return F.normalize(r, dim=-1), F.normalize(codebook, dim=-1)


# Inputs at the scale of the codes (nn.Embedding's N(0, 1) init), where both terms of the
# distance matter.
@pytest.mark.parametrize("build, search", [(chameleon, rows), (janus, rows), (glm_image, normalized_rows)],
                         ids=["chameleon", "janus", "glm_image"])
def test_training_matches(build, search):
    layer = build().quantize
    compare_training(layer, shape=(2, D, 4, 5), call=lambda m, z: m(z), search_space=search)


def test_emu3_indices_match():
    layer = emu3().quantize
    ours, patched = patched_copy(layer)
    assert patched == {"": "Emu3VQVAEVectorQuantizer"}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        z = torch.randn(2, 3, D, 4, 5, generator=g)
        ref, got = layer(z), ours(z)
        assert got.shape == ref.shape == (2, 3, 4, 5) and got.dtype == ref.dtype == torch.int64
        same = assert_codes_agree(z.movedim(2, -1), layer.embedding.weight, got, ref)
        assert bool(same.all())
    with pytest.raises(ValueError, match=r"hidden_state must have shape \(B, T, embed_dim, H, W\)"):
        ours(torch.randn(2, D, 4, 5))


def test_janus_model_trains_alike():
    """JanusVQVAE's forward (encode, quantize, decode) and its embedding loss, three Adam steps."""
    model = janus()
    before = tensor_objects(model)
    ours, patched = patched_copy(model)
    assert patched == {"quantize": "JanusVQVAEVectorQuantizer"}
    assert all(tensor_objects(model)[k] is before[k] for k in before)

    def loss_of(m, x):
        out = m(x)
        return F.mse_loss(out.decoded_pixel_values, x) + out.embedding_loss

    g = torch.Generator().manual_seed(1)
    train_models_alike(model, ours, [torch.rand(2, 3, 8, 8, generator=g) for _ in range(3)], loss_of)
    assert vqkern.unpatch(ours) == {"quantize": "JanusVQVAEVectorQuantizer"}


@pytest.mark.parametrize("build", [chameleon, glm_image], ids=["chameleon", "glm_image"])
def test_no_rows_by_codes_matrix(build):
    layer = build().quantize
    layer.embedding = torch.nn.Embedding(512, D)
    assert_no_rows_by_codes(layer, patched_copy(layer)[0], torch.randn(4, D, 16, 16), 512)
