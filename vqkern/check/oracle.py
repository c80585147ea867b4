"""Checks of a search, a gradient and a segment sum against fp64 plain PyTorch.

Shared by the fuzz battery (``vqkern.check.fuzz``, through the public API) and the
backends' self-check (``vqkern.check.selfcheck``, through the launchers). Nothing
here goes through a backend: the oracle is fp64 arithmetic on the same tensors.

Every check reports to a :class:`Findings`: ``findings.fail(check, figure, message)``
for a violation and ``findings.worst(name, value)`` for the figures a report shows
(the worst rank excess, the worst gradient ratio).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .policy import COS_RANK_ATOL, GRAD_FACTOR, GRAD_FLOOR_ULPS, RANK_RTOL, U32, dist_rtol, exact_distances, rank_scale


class Findings:
    """What the checks of one case found: ``fails``, a list of (check, figure, message),
    and ``figures``, the worst value of each named figure ("rank", "grad")."""

    def __init__(self, fails: list | None = None, figures: dict | None = None, prefix: str = ""):
        self.fails: list[tuple[str, float, str]] = [] if fails is None else fails
        self.figures: dict[str, float] = {} if figures is None else figures
        self.prefix = prefix

    def fail(self, check: str, figure: float, message: str) -> None:
        self.fails.append((self.prefix + check, figure, message))

    def worst(self, name: str, value: float) -> None:
        if not value <= self.figures.get(name, -math.inf):  # NaN counts as worst
            self.figures[name] = value

    def under(self, op: str) -> Findings:
        """The same findings, with the failures reported from here on named "<op> <check>"."""
        return Findings(self.fails, self.figures, f"{self.prefix}{op} ")


def finite_max(t: torch.Tensor) -> float:
    """The largest |element| among the finite ones (0 when none is finite)."""
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def grad_error(got, exact, free_rows=None):
    """Max |got - exact| over exact's finite elements (inf if got is non-finite there), and
    whether got is non-finite wherever exact is (rows in ``free_rows`` are exempt)."""
    finite = torch.isfinite(exact)
    g = got.double()
    if not bool(torch.isfinite(g[finite]).all()):
        err = math.inf
    else:
        err = (g[finite] - exact[finite]).abs().max().item() if finite.any() else 0.0
    need = ~finite
    if free_rows is not None:
        need = need & ~free_rows[:, None]
    return err, bool(torch.isfinite(g[need]).logical_not().all())


def check_gradient(name, got, exact, plain, size, findings, free_rows=None) -> None:
    """The gradient rule: ``got``'s max error against the fp64 ``exact`` is at most
    GRAD_FACTOR times plain PyTorch's (``plain``, same formula in the same precision)
    plus GRAD_FLOOR_ULPS * ``size`` (the size of the terms an element sums), and ``got``
    is non-finite wherever ``exact`` is (rows in ``free_rows`` exempt). Records the ratio
    err / (plain's err + floor / GRAD_FACTOR), at most GRAD_FACTOR when the rule holds."""
    err, propagates = grad_error(got, exact, free_rows)
    plain_err, _ = grad_error(plain, exact)
    floor = GRAD_FLOOR_ULPS * size
    allowed = plain_err + floor / GRAD_FACTOR
    ratio = err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)
    findings.worst("grad", ratio)
    if not err <= GRAD_FACTOR * plain_err + floor:
        findings.fail(name, ratio, f"error {err:.3g} > {GRAD_FACTOR:g} x plain PyTorch's {plain_err:.3g} + floor "
                                   f"{floor:.3g} (ratio {ratio:.3g}; max |grad| {finite_max(exact):.3g})")
    if not propagates:
        findings.fail(name, 0, "finite gradient where the fp64 oracle's is not (a non-finite input hidden)")


def check_search(z, codebook, idx, dist, metric, findings, centred=False):
    """rank, ties, distance and non-finite rows of one search of z (N, D) against codebook
    (K, D), as the caller gave them (``metric`` "cosine": the chosen code of each row's unit
    vector and ``dist`` = 1 - cos). idx (N,) int64 in [0, K), dist (N,) float32.

    Returns the fp64 distance (1 - cos for cosine) of each row's chosen code and the fp64
    unit codes (cosine; else None). ``centred``: the search ranks in the frame centred on
    the codebook (``vqkern.backends.centred_ranking``), so its bound follows the spread."""
    n, k, d = z.shape[0], codebook.shape[0], z.shape[1]
    device = z.device
    finite_rows, nan_rows = torch.isfinite(z).all(1), torch.isnan(z).any(1)
    finite_codes = torch.isfinite(codebook).all(1)
    z64, cb64 = z.double(), codebook.double()
    en64 = None
    if metric == "cosine":
        zn64, en64 = F.normalize(z64, dim=1), F.normalize(cb64, dim=1)
        exact = 0.5 * exact_distances(zn64, en64)  # 1 - cos, without the cancellation of 1 - dot
    else:
        exact = exact_distances(z64, cb64)
    chosen = exact.gather(1, idx.view(-1, 1)).squeeze(1) if n else exact.new_zeros(0)
    rows = finite_rows
    if rows.any():
        if not bool(finite_codes[idx[rows]].all()):
            bad = int(idx[rows][~finite_codes[idx[rows]]][0])
            findings.fail("rank", math.inf, f"a finite row chose the non-finite code {bad}")
        else:
            best = exact[rows][:, finite_codes].min(dim=1).values
            excess = chosen[rows] - best
            if metric == "cosine":
                worst_row = int(excess.argmax())
                worst = excess[worst_row].item()
                findings.worst("rank", worst)
                if worst > COS_RANK_ATOL:
                    findings.fail("rank", worst, f"chosen 1-cos exceeds the best by {worst:.3g} > {COS_RANK_ATOL:g} "
                                                 f"(row {int(rows.nonzero()[worst_row])})")
            else:
                relative = excess / rank_scale(z64[rows], cb64, centred)
                worst_row = int(relative.argmax())
                worst = relative[worst_row].item()
                findings.worst("rank", worst)
                if worst > RANK_RTOL:
                    row = int(rows.nonzero()[worst_row])
                    frame = "|z-c|^2+max|e-c|^2" if centred else "|z|^2+max|e|^2"
                    findings.fail("rank", worst, f"row {row} chose code {int(idx[row])}, whose distance exceeds the "
                                                 f"nearest's by {worst:.3g} of {frame} > {RANK_RTOL:g}")
        # Identical codes score identically in any order of operations: the first copy wins.
        # (Non-finite codes get distinct stand-ins: NaN rows would not group.)
        stand_in = -1e300 * (1.0 + torch.arange(k, device=device, dtype=torch.float64))[:, None]
        _, group = torch.unique(torch.where(finite_codes[:, None], cb64, stand_in), dim=0, return_inverse=True)
        first = torch.full((k,), k, dtype=torch.int64, device=device).scatter_reduce(
            0, group, torch.arange(k, device=device), "amin")[group]
        late = idx[rows] != first[idx[rows]]
        if late.any():
            i = int(late.nonzero()[0])
            findings.fail("ties", int(late.sum()), f"{int(late.sum())} rows chose a later copy of an identical code "
                                                   f"(e.g. {int(idx[rows][i])} instead of {int(first[idx[rows]][i])})")
        got, want = dist[rows].double(), chosen[rows]
        if metric == "cosine":
            tol = dist_rtol(d) * (1.0 + want)  # an fp32 dot of unit vectors errs by <= ~D 2^-24
        else:
            tol = dist_rtol(d) * want          # fp32 residual sum of D squares
        off = (got - want).abs() - tol
        if not bool(torch.isfinite(got).all()) or bool((off > 0).any()):
            j = int(torch.nan_to_num(off, nan=math.inf).argmax())
            figure = abs(got[j].item() - want[j].item())
            findings.fail("distance", figure, f"distance {got[j].item():.9g} vs exact {want[j].item():.9g} "
                                              f"(|diff| {figure:.3g} > tol {tol[j].item():.3g})")
    if (~finite_rows).any():
        bad = dist[~finite_rows]
        if bool(torch.isfinite(bad).any()) or not bool(torch.isnan(dist[nan_rows]).all()):
            findings.fail("non-finite", 0, f"non-finite rows of z gave distances {bad.tolist()[:4]} "
                                           "(want non-finite, NaN for a NaN row)")
    return chosen, en64


def check_segment_sum(z, idx, k, results, findings) -> None:
    """Counts and sums of z (N, D) per code of idx (N,) among k codes: ``results`` is
    ((counts, sums), again) with ``again`` a second deterministic run to compare bitwise
    (or None). Counts exact, sums within the fp32 summation bound of any order."""
    (counts, sums), again = results
    d = z.shape[1]
    z64 = z.double()
    ref_counts = torch.bincount(idx, minlength=k).double()
    ref_sums = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_put_((idx,), z64, accumulate=True)
    abs_sums = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_put_((idx,), z64.abs(), accumulate=True)
    if counts.dtype != torch.float32 or sums.dtype != torch.float32 or not torch.equal(counts.double(), ref_counts):
        findings.fail("segment_sum", 0, "counts wrong (or not fp32)")
        return
    # Any order of fp32 additions of m terms errs by at most (m - 1) 2^-24 sum|v|.
    err, propagates = grad_error(sums, ref_sums)
    finite = torch.isfinite(ref_sums)
    slack = ((sums.double() - ref_sums).abs() - ref_counts[:, None] * U32 * abs_sums)[finite]
    if err == math.inf or bool((slack > 0).any()) or not propagates:
        findings.fail("segment_sum", err, f"sums off by {err:.3g}, beyond the fp32 summation bound")
    if again is not None and not (torch.equal(again[0], counts)
                                  and torch.equal(again[1].view(torch.int32), sums.view(torch.int32))):
        findings.fail("segment_sum", 0, "deterministic segment_sum is not bitwise repeatable")
