"""pytest-benchmark timings of the main cases: ``pytest benchmarks/``.

CPU: pytest-benchmark's own wall-clock rounds. CUDA: the device-event median
from ``triton.testing.do_bench`` goes into ``extra_info`` (``device_median_ms``)
and is the number to read; the host rounds around it are synchronized calls.
Every case also checks that what it timed is a nearest code, so a fast wrong
answer fails.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import measure
from benchmarks.providers import PROVIDERS, Case
from benchmarks.run import make_data

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {"cpu": [(4096, 1024, 64), (2048, 4096, 256)], "cuda": [(65536, 16384, 64), (16384, 1024, 64)]}[DEVICE.type]
FORWARD = ["vqkern-torch", "vqkern-triton", "vqkern-cuda", "faiss", "expansion", "cdist", "vqpt-eval", "gemm"]
TRAIN = ["vqkern-torch", "vqkern-triton", "vqkern-cuda", "expansion", "vqpt-train-beta"]


def _setup(name, shape, pass_):
    prov = PROVIDERS[name]
    case = Case(*shape, torch.float32, DEVICE)
    ok, reason = prov.availability(DEVICE, case.dtype)
    if not ok:
        pytest.skip(f"{name}: {reason}")
    data = make_data(case, seed=0)
    return case, data, prov.build(case, data, pass_)


def _time(benchmark, fn):
    if DEVICE.type == "cuda":
        samples = measure.time_cuda(lambda: fn(0))
        benchmark.extra_info.update({k: v for k, v in measure.summarize(samples).items() if k != "samples_ms"})
        benchmark.extra_info["device_median_ms"] = benchmark.extra_info.pop("median_ms")

        def synced():
            out = fn(0)
            torch.cuda.synchronize()
            return out
        return benchmark.pedantic(synced, rounds=10, warmup_rounds=2)
    return benchmark.pedantic(fn, args=(0,), rounds=5, warmup_rounds=1)


def _assert_nearest(z, codebook, idx):
    # Tie-aware: the chosen code's exact distance equals the true minimum (fp64 residual).
    rows = torch.arange(0, z.shape[0], max(1, z.shape[0] // 256), device=z.device)
    zr, er = z[rows].double(), codebook.double()
    full = torch.cdist(zr, er) ** 2
    chosen = ((zr - er[idx[rows].long()]) ** 2).sum(1)
    torch.testing.assert_close(chosen, full.min(1).values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FORWARD)
def test_forward(benchmark, name, shape):
    case, data, fn = _setup(name, shape, "forward")
    benchmark.group = f"forward {'x'.join(map(str, shape))}"
    out = _time(benchmark, fn)
    if name == "gemm":
        assert out.shape == (case.n, case.k)
        return
    _assert_nearest(data["zs"][0], data["codebook"], out[0].reshape(-1))  # every search returns its codes first


@pytest.mark.parametrize("name", TRAIN)
def test_train(benchmark, name):
    shape = SHAPES[0]
    _, data, fn = _setup(name, shape, "train")
    benchmark.group = f"train {'x'.join(map(str, shape))}"
    _, z = _time(benchmark, fn)  # (codes, the input leaf whose .grad the step filled)
    assert z.grad is not None and z.grad.shape == z.shape
    assert torch.isfinite(z.grad).all()
    if name.startswith("vqpt"):
        # Its default rotation trick rotates and rescales the upstream gradient per row.
        assert z.grad.abs().sum() > 0
    else:
        # Straight-through: upstream gradient + the commitment term, 2 beta (z - e) / (N D).
        assert (z.grad - data["grad"]).abs().max() < 1e-3
