"""The self-check a backend passes before it serves a key in this process.

A key is (backend, device, z dtype, codebook dtype, metric, code path): the first time
``vqkern.backends.resolve`` hands a key to a backend, :func:`verdict` runs a small
battery on that device through the backend's launchers (``search``, ``backward``,
``segment_sum`` in both modes, ``sample`` where it has one) and compares each result
with fp64 plain PyTorch on the same data (``vqkern.check.oracle``: tie-aware, under the
README's precision policy). The cases cross the backend's own tile and split boundaries
(its ``tiles()``), and hold duplicate codes, near-ties, a large common offset and a NaN
row. The verdict is cached for the process; ``VQKERN_SELFCHECK=0`` turns the check off.

With ``metric="cosine"`` the backends see fp32 unit vectors whatever the inputs' dtypes
(``vqkern.functional`` normalizes them), so every cosine key is checked as one: fp32
unit rows, ranked by their squared distance.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import backends
from .. import reference as ref
from .fuzz import oracle_threads
from .oracle import Findings, check_gradient, check_search, check_segment_sum, finite_max
from .policy import dist_rtol, exact_distances

# A chi-square statistic (2 degrees of freedom) above this fails the sampling test: a
# correct sampler exceeds it with probability 3e-7, and the seed is fixed, so a backend
# either always passes or always fails it.
CHI2_LIMIT = 30.0
SEED = 20261203
# Rows of the sampling-distribution case: a sampler at twice the temperature (logits
# squared in probability) gives a statistic of about 58 here; bias towards the nearest
# code more still.
SAMPLE_ROWS = 512
# What a backend without tiles() is checked at (the reference: no tiles at all).
DEFAULT_TILES = dict(path="", rows=64, codes=64, split_rows=0, split_codes=0, d_block=16, backward_rows=64, piece=0,
                     sample_tiles=False)


class Verdict(NamedTuple):
    """A self-check's outcome: ok, the failures (one line each, naming case and mismatch),
    the cases run and the seconds it took."""
    ok: bool
    failures: tuple[str, ...]
    cases: int
    seconds: float

    @property
    def detail(self) -> str:
        """The first failure, and how many more there were."""
        if self.ok:
            return f"passed ({self.cases} cases, {self.seconds * 1e3:.0f} ms)"
        more = f" (and {len(self.failures) - 1} more failures)" if len(self.failures) > 1 else ""
        return self.failures[0] + more


_VERDICTS: dict[tuple, Verdict] = {}
_LOCK = threading.RLock()
# Batteries run in this process and their seconds, whatever clear() forgets.
_SPENT = [0, 0.0]


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def tiles(name: str, device, z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> dict:
    """The backend's blocking for these inputs (its ``tiles()``, else DEFAULT_TILES)."""
    module = backends._load(name)  # metadata, not a launch: the registry's module itself
    out = dict(DEFAULT_TILES)
    if hasattr(module, "tiles"):
        out.update(module.tiles(torch.device(device), z_dtype, codebook_dtype))
    return out


def key(name: str, device, z_dtype: torch.dtype, codebook_dtype: torch.dtype, metric: str) -> tuple:
    """The cache key of a (backend, device, dtypes, metric): cosine keys are fp32 (see the
    module docstring); the backend's code path for them is part of it."""
    device = _device(device)
    if metric == "cosine":
        z_dtype = codebook_dtype = torch.float32
    return (name, str(device), z_dtype, codebook_dtype, metric, tiles(name, device, z_dtype, codebook_dtype)["path"])


def describe_key(k: tuple) -> str:
    """A key in words: backend, device, dtypes, metric and code path."""
    name, device, z_dtype, cb_dtype, metric, path = k
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    text = f"backend {name!r} on {device}, z {short.get(z_dtype, z_dtype)}, " \
           f"codebook {short.get(cb_dtype, cb_dtype)}, metric {metric}"
    return text + (f" ({path})" if path else "")


def verdict(name: str, device, z_dtype: torch.dtype, codebook_dtype: torch.dtype, metric: str) -> tuple[tuple, Verdict]:
    """(key, verdict) of a backend for these inputs: cached, else the battery runs now.

    Raises RuntimeError, launching nothing, when the battery would have to run while a CUDA
    graph is being captured on the current stream."""
    k = key(name, device, z_dtype, codebook_dtype, metric)
    with _LOCK:
        if k in _VERDICTS:
            return k, _VERDICTS[k]
        dev = torch.device(k[1])
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"vqkern: {describe_key(k)} has not passed its self-check in this process, and it cannot run while a "
                "CUDA graph is being captured. Run one eager call with the same device, dtypes and metric before "
                "capturing (or set VQKERN_SELFCHECK=0).")
        _VERDICTS[k] = run_battery(name, dev, k[2], k[3], metric)
        _SPENT[0] += 1
        _SPENT[1] += _VERDICTS[k].seconds
        return k, _VERDICTS[k]


def verdicts(device=None) -> dict[tuple, Verdict]:
    """The verdicts reached so far in this process (on ``device`` only, if given)."""
    with _LOCK:
        if device is None:
            return dict(_VERDICTS)
        device = str(_device(device))
        return {k: v for k, v in _VERDICTS.items() if k[1] == device}


def spent() -> tuple[int, float]:
    """(batteries run, seconds they took) in this process, cleared verdicts included."""
    return _SPENT[0], _SPENT[1]


def clear() -> None:
    """Forget every verdict (the next call of each key checks again)."""
    with _LOCK:
        _VERDICTS.clear()
        backends._WARNED.clear()


# ---------------------------------------------------------------------------- the battery

def _edges(k: int, step: int) -> list[int]:
    """Codes on either side of each multiple of ``step`` below k, and the last code."""
    return sorted({c for m in range(step, k, step) for c in (m - 1, m)} | {0, k - 1}) if step else [0, k - 1]


# A tile case holding more (rows x codes) than this is split in two (rows across, codes
# across): the fp64 oracle costs O(N K D), and crossing both at once needs 2 M pairs for the
# tiled PyTorch path's 1024 x 1024 tiles (about 2 s of the battery on the loaded 2-core host).
MAX_TILE_PAIRS = 1 << 18


def plan(name: str, device, z_dtype, codebook_dtype, metric: str) -> list[dict]:
    """The battery's cases for a key: name, shape (n, k, d), data kind, what runs on it, and
    the codes at the backend's tile and split edges that rows are put next to."""
    t = tiles(name, device, z_dtype, codebook_dtype)
    sampler = hasattr(backends._load(name), "sample")
    sample = ("sample",) if sampler and t["sample_tiles"] else ()
    # A second, partly filled row block; a second code tile of 3 codes.
    n, k = t["rows"] + t["rows"] // 2 + 1, t["codes"] + 3
    tile = dict(d=5, kind="gauss", ops=("search",) + sample, edges=_edges(k, t["codes"]))
    if n * k <= MAX_TILE_PAIRS:
        cases = [dict(tile, name="row and code tiles", n=n, k=k)]
    else:
        cases = [dict(tile, name="row tiles", n=n, k=7, edges=[0, 6]), dict(tile, name="code tiles", n=33, k=k)]
    if t["split_rows"] > 0 and t["split_codes"] > 0:
        k = 2 * t["split_codes"] + 3
        cases.append(dict(tile, name="code splits", n=max(1, min(t["split_rows"], t["rows"]) - 1), k=k,
                          edges=_edges(k, t["split_codes"])))
    cases.append(dict(name="D chunks and backward row blocks", n=t["backward_rows"] + t["backward_rows"] // 2 + 1, k=7,
                      d=t["d_block"] + 3, kind="gauss", ops=("search", "backward", "segment_sum"), edges=[0, 6]))
    cases.append(dict(name="duplicate codes, near-ties and a NaN row", n=42, k=24, d=9, kind="adversarial",
                      ops=("search", "backward") + ("sample-repeat",) * sampler))
    if metric == "l2":
        cases.append(dict(name="large common offset (+100)", n=40, k=24, d=9, kind="offset",
                          ops=("search", "backward")))
    # The deterministic sums are also run twice here, to compare bitwise.
    cases.append(dict(name="a code holding more rows than a segment piece", n=max(t["piece"], 8) + 9, k=5, d=3,
                      kind="pieces", ops=("backward-repeat", "segment_sum-repeat")))
    if sampler:
        cases.append(dict(name="sampling distribution", n=SAMPLE_ROWS, k=3, d=4, kind="distribution",
                          ops=("distribution",)))
    return cases


def _data(case: dict, z_dtype, cb_dtype, metric: str):
    """(z (N, D), codebook (K, D)) on the CPU, as the backend receives them, from the seed."""
    g = torch.Generator().manual_seed(SEED + case["n"] * 7919 + case["k"] * 31 + case["d"])
    n, k, d, kind = case["n"], case["k"], case["d"], case["kind"]
    if kind == "distribution":
        # Codes at distances 1, 1.5 and 2 from z = 0 (l2: probabilities 0.51, 0.31, 0.19
        # at T = 1), or at cosines 1, 0.5, 0 of z (cosine, T = 1/2): exact in every dtype.
        z = torch.zeros(n, d, dtype=torch.float64)
        codebook = torch.zeros(k, d, dtype=torch.float64)
        if metric == "cosine":
            z[:, 0] = 1.0
            codebook[0, 0], codebook[1, 0], codebook[1, 1], codebook[2, 2] = 1.0, 0.5, 0.75 ** 0.5, 1.0
        else:
            codebook[0, 0], codebook[1, 1], codebook[2, 2] = 1.0, 1.5, 2.0
        return _as_seen(z, codebook, z_dtype, cb_dtype, metric)
    offset = 100.0 if kind == "offset" else 0.0
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64) + offset
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    if kind == "pieces":
        return _as_seen(z, codebook, z_dtype, cb_dtype, metric)
    if kind in ("adversarial", "offset"):
        for dst, src in ((5, 2), (9, 2), (20, 13), (23, 22)):
            codebook[dst] = codebook[src]
    codebook = codebook.to(cb_dtype).double()  # z's constructions below see the codes as stored
    pick = torch.randint(k, (n,), generator=g)
    other = torch.randint(k, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "gauss":
        # Every other row near a code, every fourth near a code at a tile or split edge:
        # close decisions on both sides of every boundary.
        edges = torch.tensor(case["edges"])
        pick[::4] = edges[torch.arange(len(pick[::4])) % len(edges)]
        near = torch.arange(n) % 2 == 0
        z = torch.where(near[:, None], codebook[pick] + 1e-2 * noise, z)
    else:
        dup = torch.tensor([2, 13, 22])[torch.arange(n) % 3]
        z[0:8] = codebook[dup[0:8]]                                 # on a duplicated code: an exact tie
        z[8:16] = codebook[dup[8:16]] + 1e-2 * noise[8:16]          # near a duplicated code
        z[16:32] = 0.5 * (codebook[pick[16:32]] + codebook[other[16:32]]) + 1e-6 * noise[16:32]  # near-ties
    z, codebook = _as_seen(z, codebook, z_dtype, cb_dtype, metric)
    if kind == "adversarial":
        z[n - 2, d // 2] = float("nan")  # a NaN row
    return z, codebook


def _as_seen(z64, cb64, z_dtype, cb_dtype, metric):
    if metric == "cosine":  # as vqkern.functional hands them to the backend
        return F.normalize(z64.float(), dim=1), F.normalize(cb64.float(), dim=1)
    return z64.to(z_dtype), cb64.to(cb_dtype)


def _poisoned_outputs(z):
    """Indices, distances and quantized rows that fail every check unless written."""
    n = z.shape[0]
    return (torch.full((n,), -1, dtype=torch.int64, device=z.device),
            torch.full((n,), float("nan"), dtype=torch.float32, device=z.device),
            torch.full(z.shape, float("nan"), dtype=z.dtype, device=z.device))


def _check_outputs(op, z, codebook, idx, quantized, findings) -> bool:
    """Indices in range and quantized == codebook[indices] in z's dtype; False if out of range."""
    k = codebook.shape[0]
    if not bool(((idx >= 0) & (idx < k)).all()):
        bad = int(((idx < 0) | (idx >= k)).nonzero()[0])
        findings.fail(op, math.inf, f"row {bad} got index {int(idx[bad])}, outside [0, {k}) (or left unwritten)")
        return False
    want = codebook[idx].to(z.dtype)
    same = (quantized == want) | (torch.isnan(quantized) & torch.isnan(want))
    if not bool(same.all()):
        findings.fail(op, int((~same).sum()), f"quantized != codebook[indices] on {int((~same).sum())} elements")
    return True


def _search(module, z, codebook, findings) -> None:
    idx, dist, q = _poisoned_outputs(z)
    module.search(z, codebook, idx, dist, q)
    # A search that ranks in the frame centred on the rows is held to the bound that
    # follows the data's spread (docs/precision.md).
    centred = bool(module.centred_ranking(z.device, z.dtype, codebook.dtype))
    z, codebook, idx, dist, q = (t.cpu() for t in (z, codebook, idx, dist, q))
    if _check_outputs("search", z, codebook, idx, q, findings):
        check_search(z, codebook, idx, dist, "l2", findings.under("search"), centred)


def _sample(module, z, codebook, metric, seed, findings):
    idx, dist, q = _poisoned_outputs(z)
    inv_t = 2.0 if metric == "cosine" else 1.0
    module.sample(z, codebook, inv_t, seed, metric == "cosine", idx, dist, q)
    idx, dist, q = idx.cpu(), dist.cpu(), q.cpu()
    z, codebook = z.cpu(), codebook.cpu()
    if not _check_outputs("sample", z, codebook, idx, q, findings):
        return idx
    # The drawn code's distance, from the residual, as the search reports it.
    rows = torch.isfinite(z).all(1)
    want = exact_distances(z[rows], codebook).gather(1, idx[rows].view(-1, 1)).squeeze(1)
    got = dist[rows].double()
    off = (got - want).abs() - dist_rtol(z.shape[1]) * want
    if not bool(torch.isfinite(got).all()) or bool((off > 1e-6).any()):
        j = int(torch.nan_to_num(off, nan=math.inf).argmax())
        findings.fail("sample", abs(got[j].item() - want[j].item()),
                      f"distance {got[j].item():.9g} of the drawn code vs exact {want[j].item():.9g}")
    if not bool(torch.isnan(dist[~rows]).all()):
        findings.fail("sample", 0, "a NaN row's distance is not NaN")
    return idx


def _distribution(module, z, codebook, metric, findings) -> None:
    idx = _sample(module, z, codebook, metric, SEED, findings)
    if findings.fails:
        return
    z64, cb64 = z[:1].double().cpu(), codebook.double().cpu()
    logit = z64 @ cb64.t() * 2.0 if metric == "cosine" else -exact_distances(z64, cb64).sqrt()
    p = torch.softmax(logit[0], dim=0)
    observed = torch.bincount(idx, minlength=codebook.shape[0]).double()
    expected = p * idx.numel()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    if not chi2 <= CHI2_LIMIT:
        findings.fail("sample", chi2, f"drew codes {observed.long().tolist()} where softmax(logit / T) expects "
                                      f"{[round(x, 1) for x in expected.tolist()]} "
                                      f"(chi-square {chi2:.1f} > {CHI2_LIMIT:g})")


def _backward(module, z, codebook, idx, findings, repeat=False) -> None:
    """grad_z and the per-code residual sums of the rows' codes idx (N,) (CPU int64), both
    modes, against fp64 and plain PyTorch (the same formula in fp32, landing in z's dtype)."""
    zc, cbc = z.cpu(), codebook.cpu()
    n, d = zc.shape
    k = cbc.shape[0]
    g = torch.Generator().manual_seed(SEED + n)
    resid = (cbc.double()[idx] - zc.double())
    size = finite_max(resid)
    gq = (torch.randn(n, d, generator=g, dtype=torch.float64) * max(size, 1e-30)).to(z.dtype)
    s = 0.5
    gz64 = gq.double() - s * resid
    ds64 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, resid)
    plain_resid = cbc.float()[idx] - zc.float()
    gz_plain = (gq.float() - s * plain_resid).to(z.dtype)
    ds_plain = torch.zeros(k, d).index_add_(0, idx, plain_resid)
    m = torch.bincount(idx, minlength=k).double().sqrt()[:, None]
    size_z = finite_max(gq.double().abs() + s * resid.abs())
    size_c = finite_max(torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, resid.abs()) * m)
    dev = z.device
    for deterministic in (False, True):
        grad_z = torch.full_like(z, float("nan"))
        diff_sums = torch.zeros(k, d, dtype=torch.float32, device=dev)
        module.backward(gq.to(dev), z, codebook, idx.to(dev), torch.tensor([s], device=dev), grad_z, diff_sums,
                        deterministic)
        mode = "deterministic" if deterministic else "atomic"
        check_gradient(f"backward grad_z ({mode})", grad_z.cpu(), gz64, gz_plain, size_z, findings)
        check_gradient(f"backward residual sums ({mode})", diff_sums.cpu(), ds64, ds_plain, size_c, findings)
        if deterministic and repeat:
            again = torch.zeros_like(diff_sums)
            module.backward(gq.to(dev), z, codebook, idx.to(dev), torch.tensor([s], device=dev), None, again, True)
            if not torch.equal(again.cpu().view(torch.int32), diff_sums.cpu().view(torch.int32)):
                findings.fail("backward residual sums (deterministic)", 0, "not bitwise repeatable")


def _segment_sum(module, z, codebook, idx, findings, repeat=False) -> None:
    k, d = codebook.shape[0], z.shape[1]
    dev = z.device

    def run(deterministic):
        counts = torch.zeros(k, dtype=torch.float32, device=dev)
        sums = torch.zeros(k, d, dtype=torch.float32, device=dev)
        module.segment_sum(idx.to(dev), z, counts, sums, deterministic)
        return counts.cpu(), sums.cpu()

    check_segment_sum(z.cpu(), idx, k, (run(False), None), findings)
    check_segment_sum(z.cpu(), idx, k, (run(True), run(True) if repeat else None), findings)


def _run_case(module, case, device, z_dtype, cb_dtype, metric, findings) -> None:
    z, codebook = _data(case, z_dtype, cb_dtype, metric)
    if case["kind"] == "pieces":  # one code takes piece + 3 rows, the others the rest
        idx = torch.cat([torch.zeros(case["n"] - 6, dtype=torch.int64), torch.arange(1, 7) % case["k"]])
    else:
        idx = ref.nearest_code(z, codebook)
    z, codebook = z.to(device), codebook.to(device)
    for op in case["ops"]:
        if op == "search":
            _search(module, z, codebook, findings)
        elif op == "sample":
            _sample(module, z, codebook, metric, SEED, findings)
        elif op == "sample-repeat":
            first = _sample(module, z, codebook, metric, SEED + 1, findings)
            if not torch.equal(first, _sample(module, z, codebook, metric, SEED + 1, Findings())):
                findings.fail("sample", 0, "two draws with the same seed differ")
        elif op == "distribution":
            _distribution(module, z, codebook, metric, findings)
        elif op.startswith("backward"):
            _backward(module, z, codebook, idx, findings, repeat=op.endswith("repeat"))
        elif op.startswith("segment_sum"):
            _segment_sum(module, z, codebook, idx, findings, repeat=op.endswith("repeat"))


class _Launchers:
    """A backend's launchers, each run at the caller's thread count while the oracle's
    small fp64 ops around them run at one thread (on a loaded 2-core machine a small op's
    parallel region waits for a descheduled second thread: the battery took 0.5-1.5 s per
    key at 2 threads)."""

    def __init__(self, module, threads: int):
        self._module, self._threads = module, threads

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def launch(*args):
            inner = torch.get_num_threads()
            torch.set_num_threads(self._threads)
            try:
                return fn(*args)
            finally:
                torch.set_num_threads(inner)
        return launch


def run_battery(name: str, device, z_dtype, codebook_dtype, metric: str) -> Verdict:
    """Run the battery now (uncached): the cases of :func:`plan` in order until one fails;
    each failure is a line naming the case, its shape, the operation and the mismatch."""
    module = _Launchers(backends.get(name), torch.get_num_threads())
    device = torch.device(device)
    failures = []
    cases = plan(name, device, z_dtype, codebook_dtype, metric)
    start = time.perf_counter()
    # The user's warning filters (e.g. "error") must not turn the interpreter's numpy
    # warnings or a NaN row's "invalid value" into a failure; autocast must not change
    # what the kernels compute.
    with warnings.catch_warnings(), torch.no_grad(), _no_autocast(device), oracle_threads():
        warnings.simplefilter("ignore")
        done = 0
        for case in cases:
            done += 1
            findings = Findings()
            try:
                _run_case(module, case, device, z_dtype, codebook_dtype, metric, findings)
            except Exception as exc:  # a launcher that raises fails the check, with what it said
                findings.fail("launch", math.inf, f"raised {type(exc).__name__}: {exc}")
            where = f"case '{case['name']}' (N={case['n']}, K={case['k']}, D={case['d']})"
            failures += [f"{where}, {check}: {message}" for check, _, message in findings.fails]
            if failures:  # one failing case decides; the rest would only cost time
                break
    return Verdict(not failures, tuple(failures), done, time.perf_counter() - start)


def _no_autocast(device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
