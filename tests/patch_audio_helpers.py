"""Shared checks of the audio adapters of vqkern.patch: the libraries' real modules, tie-aware
code comparison, state comparison, the patch mechanics and a largest-tensor probe."""
import copy
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


def assert_same_codes(rows, codebook, got, want, *, metric="l2", want_rtol=RANK_RTOL):
    """got and want (N,) int64 codes of rows (N, D) in codebook (K, D) are identical but
    for near-ties: where they differ, both codes are within the precision bound of the
    nearest (fp64 distances from the residual; for "cosine", of the unit vectors).
    want_rtol: a wider bound for ``want`` (an original that ranks in a 16-bit dtype)."""
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
    for codes, rtol in ((got[differ], RANK_RTOL), (want[differ], want_rtol)):
        slack = (exact.gather(1, codes.view(-1, 1)).squeeze(1) - best) / scale
        assert slack.max().item() <= rtol, (
            f"{differ.numel()} rows differ, one by {slack.max().item():.3g} of |z|^2+|e|^2 (not a near-tie)")


def assert_states_close(a: dict, b: dict, **tol):
    """Two state dicts: the same keys, shapes and dtypes, values within tol (default: fp32 allclose)."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


def check_mechanics(model: torch.nn.Module, expected: dict):
    """Patch ``model`` (unpatched so far) and check what patch promises: it returns
    ``expected`` ({path: class name}); every layer keeps its class and the model its repr;
    every buffer and parameter is the same tensor
    object and the state dict the same keys and values; a second patch changes nothing;
    unpatch leaves every method the class's own; patched again, it is served again."""
    before = dict(model.state_dict(keep_vars=True))
    snapshot = {k: v.detach().clone() for k, v in before.items()}
    text, classes = repr(model), [type(m) for m in model.modules()]
    assert vqkern.patch(model) == expected
    assert repr(model) == text and [type(m) for m in model.modules()] == classes
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


def record_searches(layers, method: str, codebook_of, rows_of=lambda x: x, codes_of=lambda out: out):
    """Wrap ``method`` of each layer, as the instance sees it (patched or not), to log
    (rows (N, D), codebook_of(layer) (K, D) at the call, codes (N,)) of every call; by
    default the method maps rows to codes, else ``rows_of(input)`` and ``codes_of(output)``."""
    log = []
    for layer in layers:
        search = getattr(layer, method)

        def logged(x, search=search, layer=layer):
            out = search(x)
            log.append((rows_of(x).detach().clone(), codebook_of(layer).detach().clone(), codes_of(out).reshape(-1)))
            return out

        layer.__dict__[method] = logged
    return log


def patched_copy(model, layers_of, method: str, codebook_of):
    """(a patched deep copy of model, [its search log, model's search log]) (record_searches
    on the layers ``layers_of(m)`` of both)."""
    patched = copy.deepcopy(model)
    assert vqkern.patch(patched)
    return patched, [record_searches(layers_of(m), method, codebook_of) for m in (patched, model)]


def assert_same_searches(got_log, want_log, *, metric="l2", want_rtol=RANK_RTOL):
    """Two logs of record_searches (patched, original): the same calls on close rows and
    codebooks, the same codes but for near-ties (judged on the original's rows and codes)."""
    assert len(got_log) == len(want_log)
    for (x, codebook, got), (x0, codebook0, want) in zip(got_log, want_log):
        torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codebook, codebook0, rtol=1e-5, atol=1e-5)
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert_same_codes(x0, codebook0, got, want, metric=metric, want_rtol=want_rtol)


def train(model, xs, call):
    """Train ``model`` on xs with SGD; per step: outputs, losses, grads, state, RNG state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(7)
    steps = []
    for x in xs:
        x = x.clone().requires_grad_()
        quantized, codes, penalty = call(model, x)
        loss = torch.nn.functional.mse_loss(quantized, x.detach() * 0.5) + penalty
        loss.backward()
        steps.append(dict(quantized=quantized.detach(), codes=codes, penalty=penalty.detach(), grad_x=x.grad,
                          grads={n: p.grad.clone() for n, p in model.named_parameters()},
                          state={k: v.clone() for k, v in model.state_dict().items()}, rng=torch.get_rng_state()))
        opt.step()
        opt.zero_grad()
    return steps


def assert_same_training(got, want):
    """Two lists of :func:`train`'s steps (patched, original) match: the same random draws
    and codes, outputs, losses, gradients and every buffer within fp32 rounding."""
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a["rng"], b["rng"]), f"step {step}: the random draws differ"
        torch.testing.assert_close(a["quantized"], b["quantized"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["codes"], b["codes"]), f"step {step}: codes differ"
        torch.testing.assert_close(a["penalty"], b["penalty"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["grad_x"], b["grad_x"], rtol=1e-5, atol=1e-7)
        assert_states_close(a["grads"], b["grads"], rtol=1e-5, atol=1e-6)
        assert_states_close(a["state"], b["state"], rtol=1e-5, atol=1e-5)


def train_parity(build, call, xs, layers_of, method, codebook_of, metric="l2", **record):
    """Train two models from ``build()`` (seeded: the same weights), one patched, on xs (see
    :func:`train`); the searches of the layers ``layers_of(model)`` must agree but for
    near-ties, then every step must match. Returns the patched model's steps."""
    original, patched = build(), build()
    assert vqkern.patch(patched)
    logs = [record_searches(layers_of(m), method, codebook_of, **record) for m in (patched, original)]
    got, want = train(patched, xs, call), train(original, xs, call)
    assert_same_searches(*logs, metric=metric)
    # codes equal but for near-ties (checked above); the training steps then match exactly
    assert_same_training(got, want)
    return got
