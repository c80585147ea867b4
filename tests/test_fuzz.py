"""Seeded fuzz test of the public API against an fp64 oracle, on every backend this machine runs.

The battery itself (case drawing, tensors, the checks of every output and gradient) is
``vqkern.check.fuzz`` (its docstring lists what each case draws and checks), shared with
``python -m vqkern.check``; this file runs it on every CPU target and the Triton
interpreter (or the GPU backends where CUDA is present).

A failure lists every failing case with its seed and parameters. Replay one case with
``VQKERN_FUZZ_SEED=<seed>[,<seed>...] python -m pytest tests/test_fuzz.py -k <target>``;
``VQKERN_FUZZ_CASES=<n>`` sets the cases per CPU target (the Triton interpreter runs a
third of them, on smaller shapes); ``-m slow`` runs ten times as many fresh seeds.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # also when this file is collected without conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vqkern import backends
from vqkern.backends import torch_
from vqkern.check.fuzz import (
    DTYPES,
    SHORT,
    describe,
    draw_case,
    draw_rows_per_code_case,
    loss_formula,
    make_tensors,
    run_case,
)

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
