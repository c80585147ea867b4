"""The frame the searches rank in: centred on the data.

The expansion ``|e|^2 - 2 z.e`` rounds in fp32 at the scale of ``|z|^2 + |e|^2``: with
data 50 standard deviations from the origin (N = 4000, K = 1024, D = 128) it chose a
farther code than the nearest on 48 of 4000 rows (up to 0.21% farther), as ``torch.cdist``
did. ``|z - e|^2`` is unchanged by a common shift, so the fp32 searches rank
``|e - c|^2 - 2 (z - c).(e - c)`` with ``c = frame_centre(z)``, and their rounding scales
with the distance of the rows and their nearest codes from c.

Why the rows' mean and not the codebook's: the rounding that can swap two codes is that of
the codes near a row, of size ``|z - c|^2``, and the mean of the rows minimizes its sum
over the rows (never above the origin's ``sum |z|^2``). The codebook's mean fails when
codes the rows never reach sit far away: with 20 of 30 codes moved to 1e3 (a way to
retire codes) it lands at ~667, and the scores of the codes near data at the origin
round at ~0.5, above their differences. A row's code then depends on the other rows of
its call only through c, so only between codes closer than the precision bound.
"""
from __future__ import annotations

import torch

# Rows whose mean is the centre: evenly spaced, at most this many (the centre need only
# lie among the data; the CPU kernel's driver samples the same rows, csrc/cpu/search_driver.h).
CENTRE_ROWS = 4096


def frame_centre(z: torch.Tensor) -> torch.Tensor:
    """The centre of the ranking frame: (D,) fp32 on z's device, the mean of the finite rows
    among ``min(N, CENTRE_ROWS)`` evenly spaced rows of z (N, D) (row ``j * N // m``),
    summed in fp64; zeros when none is finite. Deterministic, no host sync."""
    n, d = z.shape
    m = min(n, CENTRE_ROWS)
    if m == 0:
        return torch.zeros(d, dtype=torch.float32, device=z.device)
    rows = z if m == n else z.index_select(0, torch.arange(m, device=z.device) * n // m)
    rows = rows.double()
    finite = torch.isfinite(rows).all(dim=1)
    total = torch.where(finite[:, None], rows, 0.0).sum(dim=0)
    return (total / finite.sum().clamp_min(1)).float()
