"""stochastic_sample_codes: codes drawn from softmax(logits / T) by Gumbel-max over code
tiles, in distribution (chi-square against the exact probabilities) and without N x K memory."""
import subprocess
import sys
import textwrap

import pytest
import torch

import vqkern
from vqkern.compat import ResidualVQ, VectorQuantize
from vqkern.compat.sampling import gumbel_sample_codes


def exact_probs(x, codebook, temperature, cosine):
    x64, e64 = x.double(), codebook.double()
    logits = x64 @ e64.t() if cosine else -torch.cdist(x64, e64)
    return (logits / temperature).softmax(-1)


def chi_square_p_value(counts, probs):
    """p-value of Pearson's chi-square statistic with len(probs) - 1 degrees of freedom."""
    n = counts.sum()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(probs) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("tile_bytes", [None, 4 * 1024 * 2], ids=["one_tile", "tiles_of_2_codes"])
@pytest.mark.parametrize("temperature", [0.3, 2.0])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampled_frequencies_follow_softmax(cosine, tile_bytes, temperature, backend, monkeypatch):
    if backend == "triton" and not vqkern.backends.availability("triton", "cpu")[0]:
        pytest.skip("triton: no interpreter here")
    if tile_bytes is not None:
        monkeypatch.setenv("VQKERN_SAMPLE_TILE_BYTES", str(tile_bytes))  # the torch backend's code tiles
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(7, 5, generator=g) * 0.5
    x = torch.randn(1, 5, generator=g) * 0.5
    if cosine:
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
        x = torch.nn.functional.normalize(x, dim=-1)
    probs = exact_probs(x, codebook, temperature, cosine)[0]
    assert probs.min() > 1e-3 and probs.max() < 0.9, "the case must exercise several codes"
    n = 30000
    draws = gumbel_sample_codes(x.expand(n, 5), codebook, temperature, cosine=cosine,
                                generator=torch.Generator().manual_seed(1), backend=backend)
    assert draws.shape == (n,) and draws.dtype == torch.int64
    counts = torch.bincount(draws, minlength=7).double()
    p = chi_square_p_value(counts, probs)
    assert p > 1e-3, f"sampled frequencies {counts / n} differ from softmax {probs} (p = {p:.2e})"


def test_chi_square_detects_a_wrong_temperature():
    # Guards the test above: samples at T = 0.3 are rejected against softmax at T = 0.6.
    g = torch.Generator().manual_seed(0)
    codebook, x = torch.randn(7, 5, generator=g) * 0.5, torch.randn(1, 5, generator=g) * 0.5
    draws = gumbel_sample_codes(x.expand(30000, 5), codebook, 0.3, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=7).double()
    assert chi_square_p_value(counts, exact_probs(x, codebook, 0.6, False)[0]) < 1e-6


def test_low_temperature_is_the_nearest_code(monkeypatch):
    monkeypatch.setenv("VQKERN_SAMPLE_TILE_BYTES", str(4 * 64 * 16))
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(50, 8, generator=g)
    x = codebook[torch.randint(0, 50, (300,), generator=g)] + 0.01 * torch.randn(300, 8, generator=g)
    draws = gumbel_sample_codes(x, codebook, 1e-6)
    assert torch.equal(draws, torch.cdist(x, codebook).argmin(-1))


def test_bad_temperature_and_empty_input():
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sample_codes(torch.randn(3, 2), torch.randn(4, 2), 0.0)
    assert gumbel_sample_codes(torch.randn(0, 2), torch.randn(4, 2), 1.0).shape == (0,)
    with pytest.raises(ValueError, match="sample_codebook_temp"):
        VectorQuantize(dim=4, codebook_size=8, sample_codebook_temp=-1.0)


def test_layer_samples_in_training_and_searches_in_eval():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=6, stochastic_sample_codes=True, sample_codebook_temp=1.0,
                        freeze_codebook=True)
    x = torch.randn(1, 1, 4).expand(1, 20000, 4).contiguous()
    quantized, indices, _ = vq(x)
    codebook = vq.codebook.detach()
    torch.testing.assert_close(quantized, codebook[indices])
    counts = torch.bincount(indices.flatten(), minlength=6).double()
    assert chi_square_p_value(counts, exact_probs(x[0, :1], codebook, 1.0, False)[0]) > 1e-3
    # The call's temperature overrides the constructor's; 0 and eval mode search.
    nearest = torch.cdist(x[0], codebook).argmin(-1)
    assert torch.equal(vq(x, sample_codebook_temp=0.0)[1][0], nearest)
    vq.eval()
    assert torch.equal(vq(x)[1][0], nearest)


def test_residual_vq_passes_the_temperature():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=6, stochastic_sample_codes=True,
                     sample_codebook_temp=5.0, freeze_codebook=True)
    x = torch.randn(1, 1, 4).expand(1, 4000, 4).contiguous()
    sampled = rvq(x)[1]
    assert len(torch.unique(sampled[..., 0])) > 3, "a high temperature must spread the first layer's codes"
    searched = rvq(x, sample_codebook_temp=0.0)[1]
    assert len(torch.unique(searched[..., 0])) == 1


@pytest.mark.slow  # ~25 s: 4096 x 65536 logits drawn tile by tile on one thread
def test_sampling_never_materializes_n_by_k():
    # N x K fp32 is 1 GiB here; a fresh process's peak resident memory must grow by
    # far less (the inputs, the output and one 16 MiB tile of scores and one of noise).
    code = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from vqkern.compat.sampling import gumbel_sample_codes
        x, codebook = torch.randn(4096, 4), torch.randn(65536, 4)
        gumbel_sample_codes(x[:16], codebook[:16], 1.0)  # load the kernels before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = gumbel_sample_codes(x, codebook, 1.0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == (4096,) and int(out.min()) >= 0 and int(out.max()) < 65536
        print((after - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = float(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB (N x K would be 1024 MiB)"
