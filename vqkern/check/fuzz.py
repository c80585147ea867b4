"""The seeded fuzz battery of the public API against an fp64 oracle.

Each case draws N (0 included), K (1 included), D (1 to 1024), the dtypes of z and of the
codebook (fp32/fp16/bf16, mixed), the metric, the layout of z (2-D, 3-D, strided) and
adversarial data: duplicate codes, near-ties (z at the midpoint of two codes), a common
offset of +100 or of 50 standard deviations on every coordinate, z within 0.01 (or 1e-4, or 0) of possibly duplicated
codes, scales 1e-3 and 1e3, NaN/+-inf entries in rows of z and of the codebook. Through
``vqkern.nearest_code``, ``vqkern.quantize`` (forward and autograd) and ``vqkern.segment_sum``
:func:`run_case` checks, on every finite row of z:

- rank: the chosen code's exact fp64 distance is within the precision policy of the fp64
  minimum over the finite codes (docs/precision.md): l2 excess at most
  ``RANK_RTOL * (|z - c|^2 + max|e - c|^2)``, c the rows' centre (``vqkern.backends._frame``), for the searches
  that rank in the frame centred on the rows (``vqkern.backends.centred_ranking``), else
  ``RANK_RTOL * (|z|^2 + max|e|^2)`` (``policy.rank_scale``); cosine excess of ``1 - cos`` at most ``COS_RANK_ATOL``;
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

tests/test_fuzz.py runs it on every backend of the machine; ``python -m vqkern.check``
runs it per backend, dtype pair and metric.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
import torch.nn.functional as F

from .oracle import Findings, check_gradient, check_search, check_segment_sum, finite_max
from .policy import U32, dist_rtol

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WEIRD_D = (1, 2, 3, 7, 16, 33, 65, 128, 257, 1000, 1024)


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
    u = rng.random()  # a common offset: +100, or 50 standard deviations, or none
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
    """The case's parameters on one line (dtypes short, duplicates counted)."""
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


def layout(z, kind, requires_grad):
    """z as the API receives it: 2-D, 3-D or a row-strided view; a leaf when requires_grad."""
    n, d = z.shape
    if kind == "strided":
        wide = torch.zeros(n, d + 3, dtype=z.dtype, device=z.device)
        wide[:, :d] = z
        out = wide[:, :d]
    elif kind == "3d":
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


@contextlib.contextmanager
def oracle_threads():
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


def check_quantize_forward(case, z, codebook, out, shape, idx, chosen, en64, findings):
    """quantize's forward outputs: quantized (codebook[idx] in z's dtype, or the unit code
    for cosine) and the three fp32 losses against the fp64 distances ``chosen``."""
    n, d, metric, beta, z_dt = case["n"], case["d"], case["metric"], case["beta"], case["z_dtype"]
    fail = findings.fail
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


def oracle_gradients(case, z, codebook, w_raw, idx):
    """(c, w, fp64 oracle grads (z, codebook), plain PyTorch's grads, term sizes) for the backward.

    c, a power of two, brings the largest codebook gradient near 1 and w, the weight of
    sum(w * quantized), is as large as the commitment part of dz: both parts are seen
    and no half-precision gradient overflows at scale 1e3 or underflows at 1e-3.
    """
    metric, beta, z_dt = case["metric"], case["beta"], case["z_dtype"]
    z64, cb64 = z.double(), codebook.double()
    gz1, gc1, _, _ = loss_formula(z64, cb64, idx, torch.zeros_like(w_raw), 1.0, beta, metric, torch.float64)
    c = _pow2_near_inverse(finite_max(gc1))
    w = (w_raw / _pow2_near_inverse(c * finite_max(gz1))).to(z_dt)
    gz64, gc64, _, _ = loss_formula(z64, cb64, idx, w.double(), c, beta, metric, torch.float64)
    gz_plain, gc_plain, _, _ = loss_formula(z, codebook, idx, w, c, beta, metric, torch.float32)
    return c, w, (gz64, gc64), (gz_plain, gc_plain), term_sizes(case, z64, cb64, idx, w.double(), c)


def term_sizes(case, z64, cb64, idx, w64, c):
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
    return finite_max(tz), finite_max(tc)


def check_gradients(case, z_leaf, cb_leaf, idx, oracle, plain, sizes, findings):
    """The leaves' gradients after the backward, against the fp64 oracle's by the rule."""
    d, k = case["d"], case["k"]
    unchosen = torch.bincount(idx, minlength=k) == 0
    for name, leaf, exact_g, plain_g, size, dtype, free in (
            ("grad_z", z_leaf, oracle[0], plain[0], sizes[0], case["z_dtype"], None),
            ("grad_codebook", cb_leaf, oracle[1], plain[1], sizes[1], case["cb_dtype"], unchosen)):
        if leaf.grad is None or leaf.grad.dtype != dtype or leaf.grad.shape != leaf.shape:
            findings.fail(name, 0, f"missing or misshapen gradient ({None if leaf.grad is None else leaf.grad.dtype})")
            continue
        check_gradient(name, leaf.grad.reshape(-1, d), exact_g, plain_g, size, findings, free)


# ---------------------------------------------------------------------------- one case

def run_case(case, backend, device, findings=None):
    """Every check on one case through the public API with ``backend`` on ``device``; a list
    of (check, figure, message) for those that fail. ``findings`` (a Findings) given: it
    also collects the worst figures ("rank", "grad")."""
    import vqkern  # the public API (this module is imported by the backend registry's self-check)
    from vqkern import backends

    findings = Findings() if findings is None else findings
    start = len(findings.fails)
    fail = findings.fail
    z, codebook, w_raw = (t.to(device) for t in make_tensors(case))
    n, k, d, metric = case["n"], case["k"], case["d"], case["metric"]

    z_in = layout(z, case["layout"], False)
    indices, distances = vqkern.nearest_code(z_in, codebook, metric=metric, backend=backend)
    z_leaf = layout(z, case["layout"], True)
    cb_leaf = codebook.clone().requires_grad_()
    out = vqkern.quantize(z_leaf, cb_leaf, beta=case["beta"], metric=metric, backend=backend)
    with oracle_threads():
        lead = z_in.shape[:-1]
        if indices.dtype != torch.int64 or indices.shape != lead or distances.dtype != torch.float32 \
                or distances.shape != lead:
            fail("outputs", 0, f"indices {indices.dtype} {tuple(indices.shape)}, distances {distances.dtype} "
                               f"{tuple(distances.shape)}; want int64/fp32 of shape {tuple(lead)}")
            return findings.fails[start:]
        idx, dist = indices.reshape(-1), distances.reshape(-1)
        q_idx = out.indices.reshape(-1)
        for name, t in (("nearest_code", idx), ("quantize", q_idx)):
            if n and not bool(((t >= 0) & (t < k)).all()):
                fail("index-range", 0, f"{name} returned indices outside [0, {k})")
                return findings.fails[start:]
        centred = backends.centred_ranking(backend, device, z.dtype, codebook.dtype)
        chosen, en64 = check_search(z, codebook, idx, dist, metric, findings, centred)
        if not torch.equal(q_idx, idx):
            fail("quantize-indices", int((q_idx != idx).sum()), "quantize chose other indices than nearest_code")
            chosen, en64 = check_search(z, codebook, q_idx, dist, metric, Findings())
        check_quantize_forward(case, z, codebook, out, z_in.shape, q_idx, chosen, en64, findings)
        c, w, oracle, plain, sizes = oracle_gradients(case, z, codebook, w_raw, q_idx)

    (c * out.loss + (out.quantized.reshape(n, d).float() * w.float()).sum()).backward()
    segments = None
    if n:
        deterministic = case["deterministic"]
        segments = (vqkern.segment_sum(q_idx, z, k, backend=backend, deterministic=deterministic),
                    vqkern.segment_sum(q_idx, z, k, backend=backend, deterministic=True) if deterministic else None)

    with oracle_threads():
        check_gradients(case, z_leaf, cb_leaf, q_idx, oracle, plain, sizes, findings)
        if segments is not None:
            check_segment_sum(z, q_idx, k, segments, findings)
    return findings.fails[start:]
