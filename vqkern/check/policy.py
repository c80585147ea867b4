"""The precision policy as numbers (README, "Precision policy"), in one place.

The tests (tests/helpers.py, tests/test_fuzz.py), the backends' self-check and
``python -m vqkern.check`` all judge results by these bounds and this fp64 oracle.
"""
from __future__ import annotations

import torch

# Relative slack on a chosen code's distance, scaled by |z|^2 + |e|^2 (the size of
# the terms the fp32 ranking cancels): the fp32 expansion ranks codes to ~1e-7 of
# that scale; 1e-5 leaves room for accumulation order across tiles and D up to 1000.
RANK_RTOL = 1e-5
# The L2 policy bound applied to unit vectors: |a - b|^2 = 2 (1 - cos) and |a|^2 + |b|^2 = 2,
# so RANK_RTOL * 2 on the squared distance is RANK_RTOL on 1 - cos. An fp32 search from the
# inputs ranks to ~sqrt(D) * 2^-24 (2e-6 at D = 1024); half-precision unit vectors do not.
COS_RANK_ATOL = RANK_RTOL
# fp32 residual sum of D squares: relative error grows like D * 2^-24 at worst.
DIST_RTOL = {1: 1e-6, 16: 4e-6, 64: 8e-6, 1000: 8e-5}
# CONVENTIONS.md: a gradient's error is at most twice plain PyTorch's in the same precision.
GRAD_FACTOR = 2.0
# ... plus a floor of 4 fp32 ulps of sqrt(m) times the sum of the sizes of the m terms that a
# gradient element adds up (the residuals e_k - z_i of code k for the codebook): two fp32 sums
# of the same m residuals in different orders (scaled before or after the sum) differ by
# chance, by up to 4x in their max error when K*D is small (seen at 1000 cases per backend
# with residual sums: 370 rows on one code, 3.9x). The sizes are of the residuals, not of z
# and e: count * e - sum(z) errs by ~ count |e| 2^-24, which this floor does not cover when
# z is near e or far from the origin; an exactly zero gradient gets no floor.
GRAD_FLOOR_ULPS = 4 * 2.0 ** -24
U32 = 2.0 ** -24             # fp32 unit roundoff


def dist_rtol(d: int) -> float:
    """Relative tolerance of an fp32 residual distance over D columns."""
    return next(v for k, v in sorted(DIST_RTOL.items()) if d <= k) if d <= 1000 else 1e-4


def rank_scale(z2d: torch.Tensor, codebook: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """(N,) fp64: the size that RANK_RTOL multiplies for each row of z2d (N, D) against the
    codes (K, D); the one place the rank bound's scale is defined. With ``centred`` (a
    search in the frame centred on the rows, ``vqkern.backends.centred_ranking``)
    |z - c|^2 + max_k |e_k - c|^2, c the searches' own centre of z2d's rows
    (``vqkern.backends._frame.frame_centre``), which follows the data wherever it sits;
    else |z|^2 + max_k |e_k|^2, the size of the terms the fp32 expansion cancels, which
    grows with the data's distance from the origin. Non-finite codes are left out."""
    from ..backends._frame import frame_centre

    z64, e64 = z2d.double(), codebook.double()
    e64 = e64[torch.isfinite(e64).all(dim=1)]
    if centred:
        centre = frame_centre(z2d).double()
        z64, e64 = z64 - centre, e64 - centre
    top = (e64 ** 2).sum(1).max() if e64.shape[0] else z64.new_zeros(())
    return (z64 ** 2).sum(1) + top


def exact_distances(z2d: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances in fp64 from the residual, chunked to stay small."""
    z64, e64 = z2d.double(), codebook.double()
    out = []
    for start in range(0, z64.shape[0], 256):
        diff = z64[start:start + 256, None, :] - e64[None]
        out.append((diff * diff).sum(-1))
    return torch.cat(out) if out else z64.new_zeros((0, codebook.shape[0]))
