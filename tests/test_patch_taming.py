"""vqkern.patch on taming-transformers' VectorQuantizer and VectorQuantizer2 (the VQGAN lineage)."""
import numpy as np
import pytest
import torch

from patch_parity import assert_no_rows_by_codes, compare_training, patched_copy

quantize = pytest.importorskip("taming.modules.vqvae.quantize",
                               reason="taming-transformers-rom1504 is installed by requirements-test-nodeps.txt")
VectorQuantizer, VectorQuantizer2 = quantize.VectorQuantizer, quantize.VectorQuantizer2

D, K = 8, 32


def call(module, z):
    quantized, loss, info = module(z)
    return quantized, loss, info[2]


def search_space(module, z):
    return z.movedim(1, -1).reshape(-1, z.shape[1]), module.embedding.weight


@pytest.mark.parametrize("cls, kw", [(VectorQuantizer, {}), (VectorQuantizer2, {}),
                                     (VectorQuantizer2, dict(legacy=False)),
                                     (VectorQuantizer2, dict(sane_index_shape=True))],
                         ids=["v1", "v2_legacy", "v2_beta_on_commitment", "v2_sane_index_shape"])
def test_training_matches(cls, kw):
    torch.manual_seed(0)
    layer = cls(K, D, 0.25, **kw)
    compare_training(layer, shape=(2, D, 4, 5), call=call, search_space=search_space, scale=0.05)


def test_v1_perplexity_and_one_hot_are_the_originals():
    torch.manual_seed(0)
    layer = VectorQuantizer(K, D, 0.25)
    ours, _ = patched_copy(layer)
    z = torch.randn(3, D, 4, 4) * 0.05
    _, _, (perplexity, encodings, indices) = layer(z)
    _, _, (our_perplexity, our_encodings, our_indices) = ours(z)
    assert torch.equal(our_indices, indices) and our_indices.shape == (48, 1)
    assert our_perplexity.dtype == perplexity.dtype and torch.equal(our_perplexity, perplexity)
    # min_encodings: the same (N, K) one-hot, stored sparse.
    assert our_encodings.is_sparse and our_encodings.shape == encodings.shape
    assert our_encodings.dtype == encodings.dtype and torch.equal(our_encodings.to_dense(), encodings)
    codes = torch.tensor([0, 5, 31, 5])
    want = layer.get_codebook_entry(codes, (1, 2, 2, D))
    got = ours.get_codebook_entry(codes, (1, 2, 2, D))
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(ours.get_codebook_entry(codes, None), layer.get_codebook_entry(codes, None))


def test_v2_remap_matches(tmp_path):
    np.save(tmp_path / "used.npy", np.array([4, 9, 4, 0, 17], dtype=np.int64))
    torch.manual_seed(0)
    layer = VectorQuantizer2(K, D, 0.25, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True)
    ours, _ = patched_copy(layer)
    z = torch.randn(2, D, 3, 3) * 0.05
    ref, got = layer(z)[2][2], ours(z)[2][2]
    assert got.shape == ref.shape == (2, 3, 3) and torch.equal(got, ref)


def test_v2_keeps_the_gumbel_interface_checks():
    torch.manual_seed(0)
    ours, _ = patched_copy(VectorQuantizer2(K, D, 0.25))
    z = torch.randn(1, D, 2, 2)
    ours(z, temp=1.0)
    with pytest.raises(AssertionError, match="Only for interface compatible with Gumbel"):
        ours(z, temp=0.5)


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizer2], ids=["v1", "v2"])
def test_no_rows_by_codes_matrix(cls):
    """v1 builds an N x K one-hot besides the distance matrix: the patched layer, forward,
    backward and the code lookup, builds neither."""
    torch.manual_seed(0)
    layer = cls(512, D, 0.25)
    z = torch.randn(4, D, 16, 16)
    codes = torch.arange(z.numel() // D) % 512
    assert_no_rows_by_codes(layer, patched_copy(layer)[0], z, 512, extra=lambda m: m.get_codebook_entry(codes, None))
