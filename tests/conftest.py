"""Test set-up: without CUDA, the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and so vqkern) is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from vqkern import backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(names=backends.BACKENDS):
    """pytest params for every backend, skipped with the reason where it cannot run."""
    params = []
    for name in names:
        ok, reason = backends.availability(name, DEVICE)
        params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}")))
    return params


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# VQKERN_GPU_QUICK=1 (benchmarks/gpu/session.sh): a covering subset of each parametrized
# grid, so that a short GPU lease reaches every kernel path (tests/gpu_quick.py).
def pytest_collection_modifyitems(config, items):
    import gpu_quick

    if not gpu_quick.enabled():
        return
    kept, gone, counts = gpu_quick.select(items)
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = kept
    config._vqkern_quick = counts


def pytest_report_collectionfinish(config):
    counts = getattr(config, "_vqkern_quick", None)
    if counts is not None:
        import gpu_quick
        return gpu_quick.report_line(counts)


# The backends' self-check runs before each key's first call (VQKERN_SELFCHECK=0 turns it
# off): its cost in this run, beside the run's own time.
def pytest_terminal_summary(terminalreporter):
    from vqkern.check import selfcheck

    batteries, seconds = selfcheck.spent()
    if batteries:
        terminalreporter.write_line(f"vqkern self-check: {batteries} batteries (backend x device x dtypes x "
                                    f"metric), {seconds:.1f} s in all")
