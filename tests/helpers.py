"""Shared checks: tie-aware index comparison and fp64 ground truth.

The precision policy's numbers and the fp64 distances live in ``vqkern.check.policy``
(one place, shared with the fuzz battery, the backends' self-check and ``vqkern.check``).
"""
import torch

from vqkern.check.policy import DIST_RTOL, RANK_RTOL, dist_rtol, exact_distances, rank_scale  # noqa: F401


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
