"""The benchmark's check of every provider's codes, before its time is recorded.

A fast wrong kernel is not a result: at every shape the runner compares each
provider's indices with the nearest codes of the plain fp32 expansion
``|e|^2 - 2 z.e`` (cuBLAS or MKL, chunked over rows so no N x K matrix is held
whole), tie-aware as the precision policy states it (README, tests/helpers.py):
a row is wrong when the exact distance of its code, from the residual in fp64,
exceeds that of the expansion's code by more than RANK_RTOL * (|z|^2 + max|e|^2).
A provider that beats the expansion is right. The expansion's own rounding is
about 1e-7 of that scale, far inside the slack.
"""
from __future__ import annotations

import torch

# The precision policy's slack (README "Precision policy"; tests/helpers.py RANK_RTOL).
RANK_RTOL = 1e-5
CHUNK_BYTES = {"cuda": 2**30, "cpu": 2**28}  # fp32 scores held at once


def _exact(z64: torch.Tensor, e64: torch.Tensor, idx: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    """|z_i - e_idx_i|^2 in fp64, by row blocks (the gathered codes are N x D)."""
    out = torch.empty(z64.shape[0], dtype=torch.float64, device=z64.device)
    for s in range(0, z64.shape[0], rows):
        diff = z64[s:s + rows] - e64.index_select(0, idx[s:s + rows])
        out[s:s + rows] = (diff * diff).sum(1)
    return out


@torch.no_grad()
def reference(z: torch.Tensor, codebook: torch.Tensor) -> dict:
    """The fp32 expansion's codes of z (N, D) against codebook (K, D), any float dtype, with
    what the check needs: their exact distances and each row's scale, all (N,)."""
    n, k = z.shape[0], codebook.shape[0]
    z32, e32 = z.float(), codebook.float()
    norms = (e32 * e32).sum(1)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    rows = max(1, CHUNK_BYTES.get(z.device.type, 2**28) // (4 * k))
    # fp32 products, whatever a provider set before (TF32 would round the reference to 2^-11).
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for s in range(0, n, rows):
            # |e|^2 - 2 z.e: |z|^2 is constant per row.
            scores = torch.addmm(norms, z32[s:s + rows], e32.t(), alpha=-2.0)
            idx[s:s + rows] = scores.argmin(1)
            del scores
    finally:
        torch.set_float32_matmul_precision(precision)
    z64, e64 = z.double(), codebook.double()
    return {"indices": idx, "best": _exact(z64, e64, idx),
            "scale": (z64 * z64).sum(1) + (e64 * e64).sum(1).max(), "z64": z64, "e64": e64}


@torch.no_grad()
def check(ref: dict, indices) -> dict:
    """Verdict on a provider's indices (N,) against ``reference``: a JSON-ready dict with
    ``ok`` and, when not ok, ``summary`` naming the mismatch."""
    n, k = ref["indices"].shape[0], ref["e64"].shape[0]
    verdict = {"reference": f"fp32 expansion + argmin; a code is right within {RANK_RTOL:g} * (|z|^2 + max|e|^2) "
                            "of its exact distance (tie-aware)", "rows": n}
    if not isinstance(indices, torch.Tensor):
        return {**verdict, "ok": False, "summary": f"no indices returned ({type(indices).__name__})"}
    idx = indices.reshape(-1)
    if idx.shape[0] != n or idx.dtype.is_floating_point:
        return {**verdict, "ok": False, "summary": f"indices of shape {tuple(indices.shape)} and {idx.dtype}, "
                                                   f"want ({n},) integers"}
    idx = idx.to(device=ref["indices"].device, dtype=torch.int64)
    bad = int(((idx < 0) | (idx >= k)).sum())
    if bad:
        return {**verdict, "ok": False, "summary": f"{bad} of {n} indices outside [0, {k})"}
    excess = (_exact(ref["z64"], ref["e64"], idx) - ref["best"]) / ref["scale"]
    wrong = excess > RANK_RTOL
    worst = int(excess.argmax()) if n else 0
    verdict.update(ok=not bool(wrong.any()), wrong_rows=int(wrong.sum()),
                   worst_excess=float(excess[worst]) if n else 0.0,
                   same_index_rows=int((idx == ref["indices"]).sum()))
    if not verdict["ok"]:
        verdict["summary"] = (f"WRONG CODES: {verdict['wrong_rows']} of {n} rows chose a code farther than the fp32 "
                              f"expansion's by more than {RANK_RTOL:g} (|z|^2 + max|e|^2); worst {excess[worst]:.3g} "
                              f"at row {worst} (code {int(idx[worst])}, expansion {int(ref['indices'][worst])})")
    return verdict
