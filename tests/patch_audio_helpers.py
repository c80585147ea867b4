"""Shared checks of the audio adapters of vqkern.patch: the libraries' real modules, tie-aware
code comparison, state comparison, the patch mechanics and a largest-tensor probe."""
import importlib.util
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vqkern
from vqkern.integrations import state
from vqkern.integrations.imports import import_module

from helpers import RANK_RTOL, exact_distances

# The package __init__ of encodec and descript-audio-codec imports torchaudio, which
# does not load beside the CPU torch: their modules are loaded without it.
_SKIP_INIT = {"encodec": ("encodec",), "dac": ("dac", "dac.nn")}


def library(name: str):
    """A module of an installed library (requirements-test*.txt installs them), e.g.
    "encodec.quantization.core_vq"; the test skips, with the reason, where it is missing."""
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"{top} is not installed (make venv installs it from requirements-test-nodeps.txt)")
    return import_module(name, skip_init=_SKIP_INIT.get(top, ()))


def assert_same_codes(rows, codebook, got, want, *, metric="l2"):
    """got and want (N,) int64 codes of rows (N, D) in codebook (K, D) are identical but
    for near-ties: where they differ, both codes are within the precision bound of the
    nearest (fp64 distances from the residual; for "cosine", of the unit vectors)."""
    rows, codebook = rows.detach().reshape(-1, codebook.shape[1]).double(), codebook.detach().double()
    if metric == "cosine":
        rows, codebook = torch.nn.functional.normalize(rows, dim=1), torch.nn.functional.normalize(codebook, dim=1)
    got, want = got.reshape(-1), want.reshape(-1)
    differ = (got != want).nonzero().squeeze(1)
    if differ.numel() == 0:
        return
    exact = exact_distances(rows[differ], codebook)
    best = exact.min(dim=1).values
    scale = (rows[differ] ** 2).sum(1) + (codebook ** 2).sum(1).max()
    for codes in (got[differ], want[differ]):
        slack = (exact.gather(1, codes.view(-1, 1)).squeeze(1) - best) / scale
        assert slack.max().item() <= RANK_RTOL, (
            f"{differ.numel()} rows differ, one by {slack.max().item():.3g} of |z|^2+|e|^2 (not a near-tie)")


def assert_states_close(a: dict, b: dict, **tol):
    """Two state dicts: the same keys, shapes and dtypes, values within tol (default: fp32 allclose)."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


def check_mechanics(model: torch.nn.Module, expected: dict):
    """Patch ``model`` (unpatched so far) and check what patch promises: it returns
    ``expected`` ({path: class name}); every buffer and parameter is the same tensor
    object and the state dict the same keys and values; a second patch changes nothing;
    unpatch leaves every method the class's own; patched again, it is served again."""
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    snapshot = {k: v.detach().clone() for k, v in before.items()}
    assert vqkern.patch(model) == expected
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key in before:
        assert after[key] is before[key], key
        assert torch.equal(after[key].detach(), snapshot[key]), key
    layers = {path: model.get_submodule(path) for path in expected}
    bound = {path: {name: layer.__dict__[name] for name in state(layer).names} for path, layer in layers.items()}
    assert vqkern.patch(model) == {}
    for path, layer in layers.items():
        assert {name: layer.__dict__[name] for name in state(layer).names} == bound[path]
    assert vqkern.unpatch(model) == expected
    for path, layer in layers.items():
        assert state(layer) is None
        for name in bound[path]:
            assert name not in layer.__dict__
            assert getattr(layer, name).__func__ is getattr(type(layer), name)
    assert vqkern.patch(model) == expected
    for path, layer in layers.items():
        assert all(isinstance(layer.__dict__[name], types.MethodType) for name in bound[path])


@pytest.fixture
def one_thread():
    """These tests check values, not speed: on one thread, because a 2-thread OpenMP region
    of the CPU search took 47 ms instead of 0.7 ms (200 x 64 codes) on a 2-core machine
    under a load average of 7.6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns while active
    (what a one-hot, a distance matrix or k-means' N x K x D differences would show)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def record_searches(layers, method: str, codebook_of):
    """Wrap ``method`` (rows (N, D) -> codes (N,)) of each layer, as the instance sees it
    (patched or not), to log (rows, codebook_of(layer) at the call, codes) of every call."""
    log = []
    for layer in layers:
        search = getattr(layer, method)

        def logged(x, search=search, layer=layer):
            codes = search(x)
            log.append((x.detach().clone(), codebook_of(layer).detach().clone(), codes))
            return codes

        layer.__dict__[method] = logged
    return log


def assert_same_searches(got_log, want_log, *, metric="l2"):
    """Two logs of record_searches (patched, original): the same calls on close rows and
    codebooks, the same codes but for near-ties (judged on the original's rows and codes)."""
    assert len(got_log) == len(want_log)
    for (x, codebook, got), (x0, codebook0, want) in zip(got_log, want_log):
        torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codebook, codebook0, rtol=1e-5, atol=1e-5)
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert_same_codes(x0, codebook0, got, want, metric=metric)
