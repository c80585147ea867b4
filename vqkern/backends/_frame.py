"""The frame the searches rank in: centred on the data.

The expansion ``|e|^2 - 2 z.e`` rounds in fp32 at the scale of ``|z|^2 + |e|^2``: with
data 50 standard deviations from the origin (N = 4000, K = 1024, D = 128) it chose a
farther code than the nearest on 48 of 4000 rows (up to 0.21% farther), as ``torch.cdist``
did. ``|z - e|^2`` is unchanged by a common shift, so the fp32 searches rank
``|e - c|^2 - 2 (z - c).(e - c)`` with ``c = frame_centre(z)``, and their rounding scales
with the distance of the rows and their nearest codes from c.

Why the rows and not the codebook: the rounding that can swap two codes is that of the
codes near a row, of size ``|z - c|^2``, so c belongs among the rows. A codebook centre
fails when codes the rows never reach sit far away: with 20 of 30 codes moved to 1e3 (a
way to retire codes) the codebook's mean lands at ~667, and the scores of the codes near
data at the origin round at ~0.5, above their differences. Why a median and not a mean:
padding or outlier rows (a masked batch padded with 1e3, say) pull a mean off the data
the same way; a median stays on it while they are fewer than half the sample. A row's code
then depends on the other rows of its call only through c, so only between codes closer
than the precision bound.
"""
from __future__ import annotations

import torch

# Rows whose median is the centre: evenly spaced, at most this many (the centre need only
# lie among the data; the CPU kernel's driver samples the same rows, csrc/cpu/search_driver.h).
CENTRE_ROWS = 1024


def frame_centre(z: torch.Tensor) -> torch.Tensor:
    """The centre of the ranking frame: (D,) fp32 on z's device, per coordinate the lower
    median of the finite rows among ``m = min(N, CENTRE_ROWS)`` evenly spaced rows of z
    (N, D) (row ``j * N // m``); zeros when no sampled row is finite, or when the centre's
    squared norm is at most the lower median of the sampled rows' squared distances to it
    (data about the origin keep the origin's frame). No host sync."""
    n, d = z.shape
    m = min(n, CENTRE_ROWS)
    if m == 0:
        return torch.zeros(d, dtype=torch.float32, device=z.device)
    rows = z if m == n else z.index_select(0, torch.arange(m, device=z.device) * n // m)
    rows = rows.float()
    finite = torch.isfinite(rows).all(dim=1)
    # Rows holding a non-finite value become NaN rows, which sort after every number.
    ordered = torch.where(finite[:, None], rows, float("nan")).sort(dim=0).values
    count = finite.sum()
    mid = ((count - 1).clamp_min(0) // 2).reshape(1, 1).expand(1, d)
    centre = ordered.gather(0, mid).squeeze(0).nan_to_num(0.0)
    # Centre only data that sit off the origin: when |c|^2 is at most the median of the
    # rows' |z - c|^2, the origin's frame rounds no coarser, and it keeps the expansion
    # plain PyTorch uses (and its fine structure near 0, which moving by c would round away).
    spread = torch.where(finite, (rows.double() - centre.double()).square().sum(dim=1), float("nan"))
    spread = spread.sort().values.gather(0, mid[0, :1]).squeeze(0)
    return torch.where(centre.double().square().sum() > spread, centre, 0.0)
