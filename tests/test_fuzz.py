"""Seeded fuzz test of the public API against an fp64 oracle, on every backend this machine runs.

Each case draws N (0 included), K (1 included), D (1 to 1024), the dtypes of z and of the
codebook (fp32/fp16/bf16, mixed), the metric, the layout of z (2-D, 3-D, strided) and
adversarial data: duplicate codes, near-ties (z at the midpoint of two codes), a common
offset of +100 or of 50 standard deviations on every coordinate, z within 0.01 (or 1e-4, or 0) of possibly duplicated
codes, scales 1e-3 and 1e3, NaN/+-inf entries in rows of z and of the codebook. Through
``vqkern.nearest_code``, ``vqkern.quantize`` (forward and autograd) and ``vqkern.segment_sum``
it checks, on every finite row of z:

- rank: the chosen code's exact fp64 distance is within the precision policy of the fp64
  minimum over the finite codes (docs/precision.md): l2 excess at most
  ``RANK_RTOL * (|z - c|^2 + max|e - c|^2)``, c the codebook's mean, for the searches that
  rank in the frame centred on the codebook (``vqkern.backends.centred_ranking``), else
  ``RANK_RTOL * (|z|^2 + max|e|^2)`` (helpers.rank_scale); cosine excess of ``1 - cos`` at most ``COS_RANK_ATOL``;
  a finite row never picks a non-finite code;
- ties: the chosen code is the first of its identical copies (duplicates tie exactly);
- distance: against the fp64 residual ``sum((z - e)^2)`` (``1 - cos`` for cosine);
- quantize: same indices as nearest_code; ``quantized == codebook[indices]`` exactly in
  z's dtype (cosine: the unit code, to one rounding in z's dtype); the fp32 losses;
- gradients of z and of the codebook (loss = c * (codebook_loss + beta * commitment_loss)
  + sum(w * quantized)) against fp64 autograd of the reference formula with the same
  indices: max error at most twice plain PyTorch's (``GRAD_FACTOR``, CONVENTIONS.md
  section 3), where plain PyTorch is the same formula on the inputs as they are, its
  losses in fp32 as vqkern's are, its gradients landing in the inputs' dtypes; a
  gradient that is exactly zero (z equal to its codes) must come out zero, and a code no
  row chose gets a zero gradient whatever its value (NaN included), as autograd gives;
- segment_sum of z by the chosen indices: exact counts, sums within the fp32 summation
  bound, bitwise repeatable when deterministic;

and on non-finite rows of z: a valid index, a non-finite distance (NaN for a NaN row), a
non-finite loss (NaN when z holds a NaN), non-finite gradients where the oracle's are
(tests/test_functional.py's contract); finite rows are unaffected by them and by
non-finite codes (a NaN or inf code never wins, as in the CUDA kernel).

A failure lists every failing case with its seed and parameters. Replay one case with
``VQKERN_FUZZ_SEED=<seed>[,<seed>...] python -m pytest tests/test_fuzz.py -k <target>``;
``VQKERN_FUZZ_CASES=<n>`` sets the cases per CPU target (the Triton interpreter runs a
third of them, on smaller shapes); ``-m slow`` runs ten times as many fresh seeds.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # also when this file is collected without conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vqkern  # noqa: E402
from vqkern import backends  # noqa: E402
from vqkern.backends import torch_  # noqa: E402

from helpers import RANK_RTOL, dist_rtol, exact_distances, rank_scale  # noqa: E402

pytestmark = [
    # The interpreter turns runtime loop bounds into 1-element arrays and numpy warns;
    # NaN/inf inputs make numpy (interpreter) and torch warn about invalid values.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEFAULT_CASES = 100          # per CPU target
INTERPRET_SHARE = 3          # the Triton interpreter runs 1/INTERPRET_SHARE of the cases
SLOW_FACTOR = 10
BASE_SEED, SLOW_BASE_SEED = 1_000, 1_000_000

# The L2 policy bound applied to unit vectors: |a - b|^2 = 2 (1 - cos) and |a|^2 + |b|^2 = 2,
# so RANK_RTOL * 2 on the squared distance is RANK_RTOL on 1 - cos. An fp32 search from the
# inputs ranks to ~sqrt(D) * 2^-24 (2e-6 at D = 1024); half-precision unit vectors do not.
COS_RANK_ATOL = RANK_RTOL
# CONVENTIONS.md: a gradient's error is at most twice plain PyTorch's in the same precision.
GRAD_FACTOR = 2.0
# ... plus a floor of 4 fp32 ulps of sqrt(m) times the sum of the sizes of the m terms that a
# gradient element adds up (the residuals e_k - z_i of code k for the codebook, see
# _term_sizes): two fp32 sums of the same m residuals in different orders (scaled before or
# after the sum) differ by chance, by up to 4x in their max error when K*D is small (seen
# at 1000 cases per backend with residual sums: 370 rows on one code, 3.9x). The sizes are
# of the residuals, not of z and e: count * e - sum(z) errs by ~ count |e| 2^-24, which this
# floor does not cover when z is near e or far from the origin; an exactly zero gradient
# (z equal to its codes) gets no floor.
GRAD_FLOOR_ULPS = 4 * 2.0 ** -24
U32 = 2.0 ** -24             # fp32 unit roundoff
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WEIRD_D = (1, 2, 3, 7, 16, 33, 65, 128, 257, 1000, 1024)


# ---------------------------------------------------------------------------- targets

TARGETS = {
    # name: (backend, device, VQKERN_CPU_KERNEL or None)
    "torch-cpu-kernel": ("torch", "cpu", "1"),
    "torch-cpu-tiled": ("torch", "cpu", "0"),
    "reference-cpu": ("reference", "cpu", None),
    "triton": ("triton", None, None),       # CUDA when present, else the interpreter on CPU
    "cuda": ("cuda", "cuda", None),
    "torch-cuda": ("torch", "cuda", None),
}


def _target(name, monkeypatch):
    """(backend, device, small shapes?) for a target, or a skip with the reason."""
    backend, device, cpu_kernel = TARGETS[name]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{name}: no CUDA device")
    if cpu_kernel is not None:
        monkeypatch.setenv("VQKERN_CPU_KERNEL", cpu_kernel)
        if cpu_kernel == "1" and not torch_.cpu_kernel()[0]:
            pytest.skip(f"{name}: {torch_.cpu_kernel()[1]}")
    ok, reason = backends.availability(backend, device)
    if not ok:
        pytest.skip(f"{name}: {reason}")
    interpreting = backend == "triton" and device == "cpu"
    return backend, device, interpreting


def _seeds(base, count):
    forced = os.environ.get("VQKERN_FUZZ_SEED", "").strip()
    if forced:
        return [int(s) for s in forced.split(",") if s.strip()]
    return list(range(base, base + count))


def _case_count(interpreting, factor=1, cases=None):
    n = int(os.environ.get("VQKERN_FUZZ_CASES", cases or DEFAULT_CASES)) * factor
    return max(1, math.ceil(n / INTERPRET_SHARE)) if interpreting else n


# ---------------------------------------------------------------------------- cases

def _log_int(rng, lo, hi):
    return max(lo, min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def draw_case(seed, small):
    """The parameters of case ``seed`` (a pure function of seed and small)."""
    rng = random.Random(seed)
    nmax, kmax, budget = (160, 300, 300_000) if small else (400, 2000, 2_000_000)
    n = rng.choice([0, 1]) if rng.random() < 0.1 else _log_int(rng, 2, nmax)
    k = 1 if rng.random() < 0.08 else _log_int(rng, 2, kmax)
    d = rng.choice(WEIRD_D) if rng.random() < 0.35 else _log_int(rng, 1, 1024)
    while n * k * d > budget:  # shrink the larger of N and K, keeping D as drawn
        if k >= n and k > 1:
            k = max(1, k // 2)
        else:
            n = max(1, n // 2)
    z_dtype = rng.choice(DTYPES)
    cb_dtype = z_dtype if rng.random() < 0.5 else rng.choice(DTYPES)
    metric = "cosine" if rng.random() < 0.3 else "l2"
    scale = rng.choice([1.0] * 4 + [1e-3, 1e3])
    u = rng.random()  # a common offset: +100, or 50 standard deviations (the far data), or none
    offset = 100.0 if u < 0.25 else 50.0 * scale if u < 0.4 else 0.0
    dups = [(rng.randrange(k), rng.randrange(k)) for _ in range(rng.choice([0, 0, 1, 3, k // 2]))] if k > 1 else []
    p_near = rng.choice([0.0, 0.5, 1.0])
    near_noise = rng.choice([1e-2, 1e-2, 1e-4, 0.0])
    p_tie = rng.choice([0.0, 0.0, 0.3]) if k > 1 else 0.0
    values = [float("nan"), float("inf"), float("-inf")]
    bad_z = ([(rng.randrange(n), rng.randrange(d), rng.choice(values)) for _ in range(rng.randint(1, 3))]
             if n and rng.random() < 0.12 else [])
    bad_cb = []
    if k > 1 and rng.random() < 0.12:
        rows = rng.sample(range(k), min(k - 1, rng.randint(1, 3)))  # keep a finite code
        bad_cb = [(r, rng.randrange(d), rng.choice(values)) for r in rows]
    layout = rng.choice(["2d"] * 3 + ["3d", "strided"])
    if layout == "3d" and n % 2:
        layout = "2d"
    beta = rng.choice([0.25, round(rng.uniform(0.0, 2.0), 3)])
    return dict(seed=seed, n=n, k=k, d=d, z_dtype=z_dtype, cb_dtype=cb_dtype, metric=metric,
                scale=scale, offset=offset, dups=dups, p_near=p_near, near_noise=near_noise,
                p_tie=p_tie, bad_z=bad_z, bad_cb=bad_cb, layout=layout, beta=beta,
                deterministic=rng.random() < 0.5, small=small)


def draw_rows_per_code_case(seed, small):
    """Case ``seed`` of draw_case made a sum over many rows per code: fp16/bf16 z against an
    fp32 codebook, K = 1 to 3 and 100 to 1,500 rows per code (500 when small), l2, finite
    rows and codes. Residuals of half-precision rows share their code's low bits, so a
    running fp32 sum of them errs like the rows (up to 24x plain PyTorch's error)."""
    case = draw_case(seed, small)
    rng = random.Random(-seed)
    k = rng.randint(1, 3)
    case.update(k=k, n=k * rng.randint(100, 500 if small else 1500), d=min(case["d"], 128 if small else 256),
                z_dtype=rng.choice(DTYPES[1:]), cb_dtype=torch.float32, metric="l2", dups=[], bad_z=[], bad_cb=[])
    if case["layout"] == "3d" and case["n"] % 2:
        case["layout"] = "2d"
    return case


def describe(case):
    c = dict(case)
    c["z_dtype"], c["cb_dtype"] = SHORT[c["z_dtype"]], SHORT[c["cb_dtype"]]
    c["dups"] = len(c["dups"])
    return ", ".join(f"{k}={v}" for k, v in c.items() if k != "seed")


def make_tensors(case):
    """(z (N, D) in z's dtype, codebook (K, D), w (N, D) fp64): CPU, from the case's seed."""
    g = torch.Generator().manual_seed(case["seed"])
    n, k, d, scale, offset = case["n"], case["k"], case["d"], case["scale"], case["offset"]
    codebook = (torch.randn(k, d, generator=g, dtype=torch.float64) * scale + offset).to(case["cb_dtype"])
    for dst, src in case["dups"]:
        codebook[dst] = codebook[src]
    cb64 = codebook.double()
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + offset
    kind = torch.rand(n, generator=g, dtype=torch.float64)
    near = kind < case["p_near"]
    tie = (kind >= case["p_near"]) & (kind < case["p_near"] + case["p_tie"])
    pick = torch.randint(k, (n,), generator=g)
    other = torch.randint(k, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    z = torch.where(near[:, None], cb64[pick] + case["near_noise"] * noise, z)
    z = torch.where(tie[:, None], 0.5 * (cb64[pick] + cb64[other]) + 1e-6 * noise, z)
    z = z.to(case["z_dtype"])
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    for r, c, v in case["bad_z"]:
        z[r, c] = v
    for r, c, v in case["bad_cb"]:
        codebook[r, c] = v
    return z, codebook, w


def _layout(z, layout, requires_grad):
    """z as the API receives it: 2-D, 3-D or a row-strided view; a leaf when requires_grad."""
    n, d = z.shape
    if layout == "strided":
        wide = torch.zeros(n, d + 3, dtype=z.dtype, device=z.device)
        wide[:, :d] = z
        out = wide[:, :d]
    elif layout == "3d":
        out = z.clone().view(2, n // 2, d)
    else:
        out = z.clone()
    return out.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------- oracle

def loss_formula(z_leaf, cb_leaf, idx, w, c, beta, metric, compute):
    """c * (codebook_loss + beta * commitment_loss) + sum(w * quantized), backpropagated.

    The reference's formula (vqkern.reference.quantize, cosine on F.normalize'd rows) with
    the given indices, computed in ``compute``: fp64 for the oracle, fp32 for plain PyTorch
    (losses are fp32 by contract; the gradients reach the leaves in their own dtypes).
    Returns (grad z, grad codebook, codebook_loss, commitment_loss) without touching the leaves.
    """
    z_leaf = z_leaf.detach().requires_grad_()
    cb_leaf = cb_leaf.detach().requires_grad_()
    zf, cf = z_leaf.to(compute), cb_leaf.to(compute)
    if metric == "cosine":
        zf, cf = F.normalize(zf, dim=1), F.normalize(cf, dim=1)
    e = cf[idx]
    if zf.shape[0] == 0:  # as reference.quantize: zero losses that still reach both leaves
        codebook_loss = commitment_loss = (zf.sum() + cf.sum()) * 0.0
    else:
        codebook_loss = ((zf.detach() - e) ** 2).mean()
        commitment_loss = ((zf - e.detach()) ** 2).mean()
    quantized = e.detach() + (zf - zf.detach())
    total = c * (codebook_loss + beta * commitment_loss) + (quantized * w.to(compute)).sum()
    total.backward()
    return z_leaf.grad, cb_leaf.grad, codebook_loss.detach(), commitment_loss.detach()


def _pow2_near_inverse(x):
    return 1.0 if not (x > 0 and math.isfinite(x)) else 2.0 ** max(-60, min(60, -round(math.log2(x))))


def _finite_max(t):
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


# ---------------------------------------------------------------------------- one case

@contextlib.contextmanager
def _oracle_threads():
    """One thread for the oracle's many small fp64 ops (vqkern's calls keep the default).

    On the shared 2-core machine each small op's parallel region waits for a descheduled
    second thread: 40 cases took 11.6 s at 2 threads and 1.8 s at 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_search(case, z, codebook, idx, dist, fail, centred=False):
    """rank, ties, distance and non-finite rows of one search; returns the fp64 distance
    (1 - cos for cosine) of each row's chosen code and the fp64 unit codes (cosine)."""
    n, k, d, metric = case["n"], case["k"], case["d"], case["metric"]
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
            fail("rank", math.inf, f"a finite row chose the non-finite code {bad}")
        else:
            best = exact[rows][:, finite_codes].min(dim=1).values
            excess = chosen[rows] - best
            if metric == "cosine":
                worst = excess.max().item()
                if worst > COS_RANK_ATOL:
                    fail("rank", worst, f"chosen 1-cos exceeds the best by {worst:.3g} > {COS_RANK_ATOL:g}")
            else:
                norm = rank_scale(z64[rows], cb64, centred)
                worst = (excess / norm).max().item()
                if worst > RANK_RTOL:
                    frame = "|z-c|^2+max|e-c|^2" if centred else "|z|^2+max|e|^2"
                    fail("rank", worst, f"chosen distance exceeds the best by {worst:.3g} of {frame} > {RANK_RTOL:g}")
        # Identical codes score identically in any order of operations: the first copy wins.
        # (Non-finite codes get distinct stand-ins: NaN rows would not group.)
        stand_in = -1e300 * (1.0 + torch.arange(k, device=device, dtype=torch.float64))[:, None]
        _, group = torch.unique(torch.where(finite_codes[:, None], cb64, stand_in), dim=0, return_inverse=True)
        first = torch.full((k,), k, dtype=torch.int64, device=device).scatter_reduce(
            0, group, torch.arange(k, device=device), "amin")[group]
        late = idx[rows] != first[idx[rows]]
        if late.any():
            i = int(late.nonzero()[0])
            fail("ties", int(late.sum()), f"{int(late.sum())} rows chose a later copy of an identical code "
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
            fail("distance", figure, f"distance {got[j].item():.9g} vs exact {want[j].item():.9g} "
                                     f"(|diff| {figure:.3g} > tol {tol[j].item():.3g})")
    if (~finite_rows).any():
        bad = dist[~finite_rows]
        if bool(torch.isfinite(bad).any()) or not bool(torch.isnan(dist[nan_rows]).all()):
            fail("non-finite", 0, f"non-finite rows of z gave distances {bad.tolist()[:4]} "
                                  "(want non-finite, NaN for a NaN row)")
    return chosen, en64


def _check_quantize_forward(case, z, codebook, out, shape, idx, chosen, en64, fail):
    n, d, metric, beta, z_dt = case["n"], case["d"], case["metric"], case["beta"], case["z_dtype"]
    finite_rows = torch.isfinite(z).all(1)
    quantized = out.quantized.detach().reshape(n, d)
    if out.quantized.dtype != z_dt or out.quantized.shape != shape:
        fail("quantized", 0, f"quantized {out.quantized.dtype} {tuple(out.quantized.shape)}")
    elif metric == "l2":
        want = codebook[idx].to(z_dt)
        same = (quantized == want) | (torch.isnan(quantized) & torch.isnan(want))
        if not bool(same.all()):
            fail("quantized", int((~same).sum()), "quantized != codebook[indices] in z's dtype")
    else:
        ok_rows = torch.isfinite(codebook).all(1)[idx]
        err = (quantized[ok_rows].double() - en64[idx][ok_rows]).abs()
        tol = torch.finfo(z_dt).eps + dist_rtol(d)  # one rounding to z's dtype of an fp32 unit code
        worst = err.max().item() if err.numel() else 0.0
        if not bool(torch.isfinite(err).all()) or worst > tol:
            fail("quantized", worst, f"quantized differs from the unit code by {worst:.3g} > {tol:.3g}")
    losses = (out.loss, out.commitment_loss, out.codebook_loss)
    if any(t.dtype != torch.float32 or t.shape != () for t in losses):
        fail("loss", 0, "losses must be fp32 scalars")
    elif not bool(finite_rows.all()):
        nan_in_z = bool(torch.isnan(z).any())
        if any(bool(torch.isfinite(t)) for t in losses) or (nan_in_z and not bool(torch.isnan(out.loss))):
            fail("loss", 0, f"losses {[t.item() for t in losses]} with non-finite z (want non-finite, NaN for NaN)")
    elif n:
        per_row = 2.0 * chosen if metric == "cosine" else chosen  # |zn - en|^2 = 2 (1 - cos)
        mean64 = per_row.sum().item() / (n * d)
        row_tol = 2.0 * dist_rtol(d) * (1.0 + chosen) if metric == "cosine" else dist_rtol(d) * per_row
        tol = row_tol.sum().item() / (n * d) + (n + 2) * U32 * mean64  # plus an fp32 sum of N terms
        for name, got, want in (("commitment_loss", out.commitment_loss, mean64),
                                ("codebook_loss", out.codebook_loss, mean64),
                                ("loss", out.loss, (1 + beta) * mean64)):
            if not abs(got.item() - want) <= tol * max(1.0, 1 + beta):
                fail("loss", abs(got.item() - want), f"{name} {got.item():.9g} vs exact {want:.9g} (tol {tol:.3g})")
    elif any(t.item() != 0.0 for t in losses):
        fail("loss", 0, "losses of an empty z must be 0")


def _oracle_gradients(case, z, codebook, w_raw, idx):
    """(c, w, fp64 oracle grads (z, codebook), plain PyTorch's grads) for the backward.

    c, a power of two, brings the largest codebook gradient near 1 and w, the weight of
    sum(w * quantized), is as large as the commitment part of dz: both parts are seen
    and no half-precision gradient overflows at scale 1e3 or underflows at 1e-3.
    """
    n, k, d, metric, beta, z_dt = case["n"], case["k"], case["d"], case["metric"], case["beta"], case["z_dtype"]
    z64, cb64 = z.double(), codebook.double()
    gz1, gc1, _, _ = loss_formula(z64, cb64, idx, torch.zeros_like(w_raw), 1.0, beta, metric, torch.float64)
    c = _pow2_near_inverse(_finite_max(gc1))
    w = (w_raw / _pow2_near_inverse(c * _finite_max(gz1))).to(z_dt)
    gz64, gc64, _, _ = loss_formula(z64, cb64, idx, w.double(), c, beta, metric, torch.float64)
    gz_plain, gc_plain, _, _ = loss_formula(z, codebook, idx, w, c, beta, metric, torch.float32)
    return c, w, (gz64, gc64), (gz_plain, gc_plain), _term_sizes(case, z64, cb64, idx, w.double(), c)


def _term_sizes(case, z64, cb64, idx, w64, c):
    """(dz, dE) sizes of the fp32 rounding error each gradient element may carry, for the floor.

    l2: |w| + c beta 2/(N D) |z - e| per element of dz; sqrt(m_k) c 2/(N D) sum_i |e_k - z_i|
    per element of dE, a sum of the m_k residuals of code k (rounding errors of a sum grow
    like sqrt(m) in any order of additions). Cosine: the same on the unit vectors, through
    normalize's Jacobian (I - u u^T) / |x|, whose elements are at most 2 |g|_2 / |x|.
    """
    n, k, d, beta = case["n"], case["k"], case["d"], case["beta"]
    if not n:
        return 0.0, 0.0
    zf, cf = z64, cb64
    if case["metric"] == "cosine":
        zf, cf = F.normalize(z64, dim=1), F.normalize(cb64, dim=1)
    s = c * 2.0 / (n * d)
    r = (zf - cf[idx]).abs()
    tz = w64.abs() + s * beta * r
    tc = torch.zeros(k, d, dtype=torch.float64, device=z64.device).index_put_((idx,), s * r, accumulate=True)
    tc = tc * torch.bincount(idx, minlength=k).double().sqrt()[:, None]  # a sum of m terms: ~sqrt(m) roundings
    if case["metric"] == "cosine":
        tz = 2 * tz.norm(dim=1, keepdim=True) / z64.norm(dim=1, keepdim=True)
        tc = 2 * tc.norm(dim=1, keepdim=True) / cb64.norm(dim=1, keepdim=True)
    return _finite_max(tz), _finite_max(tc)


def _check_gradients(case, z_leaf, cb_leaf, idx, oracle, plain, sizes, fail):
    d, k = case["d"], case["k"]
    unchosen = torch.bincount(idx, minlength=k) == 0
    for name, leaf, exact_g, plain_g, size, dtype, free in (
            ("grad_z", z_leaf, oracle[0], plain[0], sizes[0], case["z_dtype"], None),
            ("grad_codebook", cb_leaf, oracle[1], plain[1], sizes[1], case["cb_dtype"], unchosen)):
        if leaf.grad is None or leaf.grad.dtype != dtype or leaf.grad.shape != leaf.shape:
            fail(name, 0, f"missing or misshapen gradient ({None if leaf.grad is None else leaf.grad.dtype})")
            continue
        err, propagates = grad_error(leaf.grad.reshape(-1, d), exact_g, free)
        plain_err, _ = grad_error(plain_g, exact_g)
        floor = GRAD_FLOOR_ULPS * size
        if not err <= GRAD_FACTOR * plain_err + floor:
            ratio = err / plain_err if plain_err else math.inf
            fail(name, ratio, f"error {err:.3g} > {GRAD_FACTOR:g} x plain PyTorch's {plain_err:.3g} + floor "
                              f"{floor:.3g} (ratio {ratio:.3g}; max |grad| {_finite_max(exact_g):.3g})")
        if not propagates:
            fail(name, 0, "finite gradient where the fp64 oracle's is not (a non-finite input hidden)")


def _check_segment_sum(case, z, idx, results, fail):
    (counts, sums), again = results
    k, d = case["k"], case["d"]
    z64 = z.double()
    ref_counts = torch.bincount(idx, minlength=k).double()
    ref_sums = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_put_((idx,), z64, accumulate=True)
    abs_sums = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_put_((idx,), z64.abs(), accumulate=True)
    if counts.dtype != torch.float32 or sums.dtype != torch.float32 or not torch.equal(counts.double(), ref_counts):
        fail("segment_sum", 0, "counts wrong (or not fp32)")
        return
    # Any order of fp32 additions of m terms errs by at most (m - 1) 2^-24 sum|v|.
    err, propagates = grad_error(sums, ref_sums)
    finite = torch.isfinite(ref_sums)
    slack = ((sums.double() - ref_sums).abs() - ref_counts[:, None] * U32 * abs_sums)[finite]
    if err == math.inf or bool((slack > 0).any()) or not propagates:
        fail("segment_sum", err, f"sums off by {err:.3g}, beyond the fp32 summation bound")
    if again is not None and not (torch.equal(again[0], counts)
                                  and torch.equal(again[1].view(torch.int32), sums.view(torch.int32))):
        fail("segment_sum", 0, "deterministic segment_sum is not bitwise repeatable")


def run_case(case, backend, device):
    """Every check on one case; a list of (check, figure, message) for those that fail."""
    fails = []

    def fail(check, figure, msg):
        fails.append((check, figure, msg))

    z, codebook, w_raw = (t.to(device) for t in make_tensors(case))
    n, k, d, metric = case["n"], case["k"], case["d"], case["metric"]

    z_in = _layout(z, case["layout"], False)
    indices, distances = vqkern.nearest_code(z_in, codebook, metric=metric, backend=backend)
    z_leaf = _layout(z, case["layout"], True)
    cb_leaf = codebook.clone().requires_grad_()
    out = vqkern.quantize(z_leaf, cb_leaf, beta=case["beta"], metric=metric, backend=backend)
    with _oracle_threads():
        lead = z_in.shape[:-1]
        if indices.dtype != torch.int64 or indices.shape != lead or distances.dtype != torch.float32 \
                or distances.shape != lead:
            fail("outputs", 0, f"indices {indices.dtype} {tuple(indices.shape)}, distances {distances.dtype} "
                               f"{tuple(distances.shape)}; want int64/fp32 of shape {tuple(lead)}")
            return fails
        idx, dist = indices.reshape(-1), distances.reshape(-1)
        q_idx = out.indices.reshape(-1)
        for name, t in (("nearest_code", idx), ("quantize", q_idx)):
            if n and not bool(((t >= 0) & (t < k)).all()):
                fail("index-range", 0, f"{name} returned indices outside [0, {k})")
                return fails
        centred = backends.centred_ranking(backend, device, z.dtype, codebook.dtype)
        chosen, en64 = _check_search(case, z, codebook, idx, dist, fail, centred)
        if not torch.equal(q_idx, idx):
            fail("quantize-indices", int((q_idx != idx).sum()), "quantize chose other indices than nearest_code")
            chosen, en64 = _check_search(case, z, codebook, q_idx, dist, lambda *a: None)
        _check_quantize_forward(case, z, codebook, out, z_in.shape, q_idx, chosen, en64, fail)
        c, w, oracle, plain, sizes = _oracle_gradients(case, z, codebook, w_raw, q_idx)

    (c * out.loss + (out.quantized.reshape(n, d).float() * w.float()).sum()).backward()
    segments = None
    if n:
        deterministic = case["deterministic"]
        segments = (vqkern.segment_sum(q_idx, z, k, backend=backend, deterministic=deterministic),
                    vqkern.segment_sum(q_idx, z, k, backend=backend, deterministic=True) if deterministic else None)

    with _oracle_threads():
        _check_gradients(case, z_leaf, cb_leaf, q_idx, oracle, plain, sizes, fail)
        if segments is not None:
            _check_segment_sum(case, z, q_idx, segments, fail)
    return fails


# ---------------------------------------------------------------------------- tests

def _fuzz(name, monkeypatch, base, factor, draw=draw_case, cases=None):
    backend, device, interpreting = _target(name, monkeypatch)
    failed = []
    seeds = _seeds(base, _case_count(interpreting, factor, cases))
    for seed in seeds:
        case = draw(seed, small=interpreting)
        for check, figure, msg in run_case(case, backend, device):
            failed.append((case, check, figure, msg))
    if failed:
        by = defaultdict(list)
        for case, check, figure, _ in failed:
            by[(check, case["metric"], SHORT[case["z_dtype"]], SHORT[case["cb_dtype"]])].append(figure)
        summary = [f"  {check:16s} {metric:6s} z {zt} codebook {ct}: {len(v)} cases, worst figure {max(v):.3g}"
                   for (check, metric, zt, ct), v in sorted(by.items())]
        detail = [f"  seed {case['seed']} [{check}] {msg}\n      {describe(case)}"
                  for case, check, _, msg in failed[:40]]
        cases = len({case["seed"] for case, *_ in failed})
        pytest.fail(f"{name}: {cases} of {len(seeds)} cases failed ({len(failed)} checks)\n" + "\n".join(summary)
                    + "\n" + "\n".join(detail) + f"\nreplay: VQKERN_FUZZ_SEED=<seed> python -m pytest "
                    f"tests/test_fuzz.py -k '{name}'", pytrace=False)


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name, monkeypatch):
    _fuzz(name, monkeypatch, BASE_SEED, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_many(name, monkeypatch):
    _fuzz(name, monkeypatch, SLOW_BASE_SEED, SLOW_FACTOR)


# Cases of many rows per code (draw_rows_per_code_case), per CPU target.
ROWS_PER_CODE_CASES = 12


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_rows_per_code(name, monkeypatch):
    _fuzz(name, monkeypatch, BASE_SEED, 1, draw_rows_per_code_case, ROWS_PER_CODE_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_rows_per_code_many(name, monkeypatch):
    _fuzz(name, monkeypatch, SLOW_BASE_SEED, SLOW_FACTOR, draw_rows_per_code_case, ROWS_PER_CODE_CASES)


def test_cases_are_reproducible_and_cover_the_space():
    # Same seed, same tensors bit for bit; and the default seeds reach every corner the
    # module docstring promises (so a change of draw_case cannot quietly drop one).
    a, b = make_tensors(draw_case(1234, False)), make_tensors(draw_case(1234, False))
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    cases = [draw_case(s, False) for s in range(BASE_SEED, BASE_SEED + DEFAULT_CASES)]
    small = [draw_case(s, True) for s in range(BASE_SEED, BASE_SEED + math.ceil(DEFAULT_CASES / INTERPRET_SHARE))]
    for pool in (cases, small):
        seen = lambda f: any(f(c) for c in pool)  # noqa: E731
        assert seen(lambda c: c["n"] == 0) and seen(lambda c: c["k"] == 1) and seen(lambda c: c["d"] == 1)
        assert seen(lambda c: c["metric"] == "cosine") and seen(lambda c: c["z_dtype"] != c["cb_dtype"])
        assert seen(lambda c: c["offset"] == 100.0 and c["p_near"] > 0 and c["dups"])
        assert seen(lambda c: c["offset"] == 50.0 * c["scale"] and c["metric"] == "l2" and c["p_near"] == 0)
        assert seen(lambda c: c["scale"] == 1e-3) and seen(lambda c: c["scale"] == 1e3)
        assert seen(lambda c: c["p_tie"] > 0) and seen(lambda c: c["layout"] == "strided")
        assert seen(lambda c: any(v != v for *_, v in c["bad_z"])) and seen(lambda c: c["bad_cb"])
        assert seen(lambda c: any(v == math.inf for *_, v in c["bad_cb"]))
        for dt in DTYPES:
            assert seen(lambda c: c["z_dtype"] == dt and c["metric"] == "l2")
    assert max(c["d"] for c in cases) >= 1000


def test_oracle_gradient_is_the_loss_derivative():
    # The oracle's gradient, checked against finite differences with the indices held fixed.
    # Finite differences see through detach(), so the stop-gradients become constant inputs:
    # f(z, E) = c (mean((sg_z - E[idx])^2) + beta mean((z - sg_E[idx])^2)) + sum(w (sg_E[idx] + z - sg_z))
    # with sg_z = z and sg_E = E held fixed (normalized first for cosine); gradcheck proves
    # autograd's derivative of f, and the oracle must equal it. For l2 also the closed form
    # dz = w + c beta 2/(N D) (z - e_idx), dE_k = c 2/(N D) sum_{i: idx_i = k} (e_k - z_i).
    g = torch.Generator().manual_seed(7)
    z = torch.randn(9, 5, generator=g, dtype=torch.float64) + 3.0
    cb = torch.randn(4, 5, generator=g, dtype=torch.float64) + 3.0
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 3])  # code 2 unused
    c, beta = 3.0, 0.4
    for metric in ("l2", "cosine"):
        unit = (lambda t: F.normalize(t, dim=1)) if metric == "cosine" else (lambda t: t)

        def f(zz, cc, unit=unit):
            zf, e, sg_z, sg_e = unit(zz), unit(cc)[idx], unit(z), unit(cb)[idx]
            loss = ((sg_z - e) ** 2).mean() + beta * ((zf - sg_e) ** 2).mean()
            return c * loss + ((sg_e + zf - sg_z) * w).sum()

        zz, cc = z.clone().requires_grad_(), cb.clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (zz, cc))
        f(zz, cc).backward()
        gz, gc, _, _ = loss_formula(z, cb, idx, w, c, beta, metric, torch.float64)
        torch.testing.assert_close(gz, zz.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gc, cc.grad, rtol=1e-12, atol=1e-12)
    gz, gc, _, _ = loss_formula(z, cb, idx, w, c, beta, "l2", torch.float64)
    s = c * 2 / z.numel()
    torch.testing.assert_close(gz, w + beta * s * (z - cb[idx]), rtol=0, atol=1e-13)
    torch.testing.assert_close(gc, torch.zeros_like(cb).index_add_(0, idx, s * (cb[idx] - z)), rtol=0, atol=1e-13)
    assert bool((gc[2] == 0).all())
