"""Shared checks: tie-aware index comparison and fp64 ground truth."""
import torch

# Relative slack on a chosen code's distance, scaled by the size of the terms the fp32
# ranking cancels (rank_scale): the fp32 expansion ranks codes to ~1e-7 of that scale;
# 1e-5 leaves room for accumulation order across tiles and D up to 1000.
RANK_RTOL = 1e-5
# fp32 residual sum of D squares: relative error grows like D * 2^-24 at worst.
DIST_RTOL = {1: 1e-6, 16: 4e-6, 64: 8e-6, 1000: 8e-5}


def dist_rtol(d: int) -> float:
    return next(v for k, v in sorted(DIST_RTOL.items()) if d <= k) if d <= 1000 else 1e-4


def exact_distances(z2d: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances in fp64 from the residual, chunked to stay small."""
    z64, e64 = z2d.double(), codebook.double()
    out = []
    for start in range(0, z64.shape[0], 256):
        diff = z64[start:start + 256, None, :] - e64[None]
        out.append((diff * diff).sum(-1))
    return torch.cat(out) if out else z64.new_zeros((0, codebook.shape[0]))


def rank_scale(z2d, codebook, centred):
    """(N,) fp64, the scale of each row's rank bound (RANK_RTOL * scale): with ``centred``
    (a search in the frame centred on the codebook, vqkern.backends.centred_ranking)
    |z - c|^2 + max_k |e_k - c|^2, c the mean of the finite codes, which follows the data's
    spread wherever it sits; else |z|^2 + max_k |e_k|^2, which grows with the data's
    distance from the origin. Non-finite codes are left out of the max."""
    z64, e64 = z2d.double(), codebook.double()
    e64 = e64[torch.isfinite(e64).all(dim=1)]
    if centred and e64.shape[0]:
        centre = e64.mean(dim=0)
        z64, e64 = z64 - centre, e64 - centre
    top = (e64 ** 2).sum(1).max() if e64.shape[0] else z64.new_zeros(())
    return (z64 ** 2).sum(1) + top


def assert_nearest(z2d, codebook, indices, distances=None, centred=False, exact=None):
    """Tie-aware: each chosen code is within RANK_RTOL * rank_scale(z2d, codebook, centred)
    of the true nearest one. ``exact``: exact_distances(z2d, codebook), when already at hand."""
    assert indices.dtype == torch.int64
    exact = exact_distances(z2d, codebook) if exact is None else exact
    assert indices.shape == (z2d.shape[0],)
    assert bool(((indices >= 0) & (indices < codebook.shape[0])).all()), "index out of range"
    chosen = exact.gather(1, indices.view(-1, 1)).squeeze(1)
    best = exact.min(dim=1).values
    scale = rank_scale(z2d, codebook, centred)
    slack = chosen - best
    worst = (slack / scale).max().item() if slack.numel() else 0.0
    frame = "|z-c|^2+|e-c|^2" if centred else "|z|^2+|e|^2"
    assert worst <= RANK_RTOL, f"a chosen code is farther than the nearest by {worst:.3g} of {frame}"
    if distances is not None:
        assert distances.dtype == torch.float32
        torch.testing.assert_close(distances.double(), chosen, rtol=dist_rtol(z2d.shape[1]), atol=1e-6)
