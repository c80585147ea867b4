"""vqkern.kmeans against a plain PyTorch k-means and vector-quantize-pytorch's."""
import pytest
import torch
import torch.nn.functional as F

from vqkern import _library
from vqkern.kmeans import kmeans


def plain_kmeans(x, init, iters, cosine=False):
    """Textbook Lloyd iterations in float64 with a dense distance matrix."""
    x = x.double()
    means = init.double().clone()
    if cosine:
        x, means = F.normalize(x, dim=-1), F.normalize(means, dim=-1)
    for _ in range(iters):
        assign = torch.cdist(x, means).argmin(dim=1)
        counts = torch.bincount(assign, minlength=means.shape[0]).double()
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1).unsqueeze(1)
        if cosine:
            new = F.normalize(new, dim=-1)
        means = torch.where((counts == 0).unsqueeze(1), means, new)
    return means, counts


def blobs(n, d, centers, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 4
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,d,c", [(500, 3, 7), (1000, 33, 50), (64, 1, 5)])
def test_matches_plain_kmeans_from_same_init(metric, n, d, c):
    x = blobs(n, d, c, seed=n + d)
    init = x[torch.randperm(n)[:c]].clone()
    centroids, counts = kmeans(x, c, 6, metric=metric, init=init)
    ref_means, ref_counts = plain_kmeans(x, init, 6, cosine=metric == "cosine")
    assert centroids.shape == (c, d) and centroids.dtype == torch.float32
    assert counts.shape == (c,) and counts.dtype == torch.float32
    assert torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(centroids.double(), ref_means, atol=1e-5, rtol=1e-5)
    assert counts.sum() == n


def test_empty_cluster_keeps_its_centroid():
    x = torch.randn(200, 4)
    init = torch.cat([x[:3], torch.full((1, 4), 1e3)])  # the last centroid attracts nothing
    centroids, counts = kmeans(x, 4, 5, init=init)
    assert counts[3] == 0
    assert torch.equal(centroids[3], init[3])
    ref_means, _ = plain_kmeans(x, init, 5)
    torch.testing.assert_close(centroids.double(), ref_means, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("n", [300, 10])  # 10 < C: seeds drawn with replacement
def test_matches_vector_quantize_pytorch_kmeans_with_same_seed(cosine, n):
    vq_kmeans = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch").kmeans
    x = blobs(n, 8, 6, seed=3)
    if cosine:
        x = F.normalize(x, dim=-1)  # vector_quantize_pytorch normalizes before its k-means
    torch.manual_seed(7)
    ref_means, ref_bins = vq_kmeans(x.unsqueeze(0), 16, 5, use_cosine_sim=cosine)
    torch.manual_seed(7)
    centroids, counts = kmeans(x, 16, 5, metric="cosine" if cosine else "l2")
    assert torch.equal(counts, ref_bins[0].float())
    torch.testing.assert_close(centroids, ref_means[0], atol=1e-5, rtol=1e-5)


def test_uses_fused_search_and_segment_sum(monkeypatch):
    calls = []
    for name in ("search", "segment_sum"):
        original = getattr(_library, name)
        monkeypatch.setattr(_library, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    kmeans(torch.randn(100, 4), 5, 3)
    assert calls == ["search", "segment_sum"] * 3


def test_reference_backend_agrees():
    x = blobs(300, 5, 4, seed=1)
    init = x[:9].clone()
    a = kmeans(x, 9, 4, init=init, backend="torch")
    b = kmeans(x, 9, 4, init=init, backend="reference")
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.centroids, b.centroids, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 0, 3)
    with pytest.raises(ValueError, match="iters"):
        kmeans(x, 2, 0)
    with pytest.raises(ValueError, match="metric"):
        kmeans(x, 2, 1, metric="dot")
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, 1, init=torch.randn(3, 3))
    with pytest.raises(ValueError, match="x"):
        kmeans(torch.randn(10), 2, 1)
    with pytest.raises(ValueError, match="no rows"):
        kmeans(torch.randn(0, 3), 2, 1)


@pytest.mark.slow
def test_large_clustering_stays_in_bounded_memory():
    # 100k rows into 10k centroids: a dense distance matrix would be 4 GB in fp32.
    x = torch.randn(100_000, 16)
    centroids, counts = kmeans(x, 10_000, 2)
    assert counts.sum() == x.shape[0] and torch.isfinite(centroids).all()
