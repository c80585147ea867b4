"""Every autotuning config of the Triton search kernel, launched one by one.

Autotuning runs only its winner, so a config that compiles to a wrong kernel (a mask
off by a tile, a split boundary that drops codes) would go unseen until the day it
wins on some GPU. Here each config of ``search.SEARCH_CONFIGS`` is pinned in turn
(``VQKERN_TRITON_SEARCH_CONFIG``) and launched through the launchers in every kernel
mode: tensor-core dtypes, chunked D, the fp32 FMA path, mixed dtypes, split-K, the
tensor-core fp32 search with its exact re-check, and Gumbel sampling.

The data are exact in every format the kernels use: integer codes and rows on a
1/16 grid, so bf16, fp16 and tf32 hold them unrounded and every residual sum is exact
in fp32 whatever the summation order or tile shape. So every config must return a code
at exactly the nearest distance (rows set midway between two distinct codes are exact
ties, which the fp32 modes, ranking in the frame centred on the rows' mean, may
resolve either way: the README's precision policy; an exact copy of a code never wins
over it) and bitwise that distance: on a GPU that is the comparison of differently
compiled kernels, within an ulp and tighter.
On this CPU the interpreter runs the same launches on tiny shapes (it runs one
config at a time, which is all this needs).
"""
import importlib

import pytest
import torch

from helpers import assert_nearest

# The Triton kernel tests' set-up: the interpreter on CPU, the skip without Triton, the
# poisoned outputs (only these names: importing a test would collect it twice).
from test_triton_kernels import _OK, DEVICE, _poisoned, pytestmark  # noqa: F401

if _OK:
    from vqkern.backends import triton as tk

    # The module (the package re-exports its launcher under the same name).
    search_module = importlib.import_module("vqkern.backends.triton.search")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# On the GPU: several row blocks and code tiles, each with a partial last one, at every
# config. In the interpreter (a few ms per block op): one or two row blocks and code tiles.
N, K = (700, 1100) if DEVICE == "cuda" else (70, 150)

# name -> (z dtype, codebook dtype, D, launch keywords); D = 150 is past one tensor-core
# chunk (128 columns) on the GPU and past the interpreter's 64.
MODES = {
    "bf16": ("bf16", "bf16", 20, {}),
    "fp16-chunked-d": ("fp16", "fp16", 150, {}),
    "fp32-ieee": ("fp32", "fp32", 20, {"fp32_precision": "ieee"}),
    "bf16-fp32-mixed": ("bf16", "fp32", 20, {}),
    "fp32-split-k": ("fp32", "fp32", 20, {"num_splits": 3, "fp32_precision": "ieee"}),
    "fp32-tf32x3-recheck": ("fp32", "fp32", 20, {"fp32_precision": "tf32x3", "recheck": True}),
    "fp32-tf32-split-recheck": ("fp32", "fp32", 20, {"fp32_precision": "tf32", "recheck": True, "num_splits": 3}),
}


def _exact_data(zt, ct, d, seed):
    """Integer codes in [-8, 8] and rows on a 1/16 grid: a random code plus up to 1/2 per
    coordinate, and every fifth row midway between a code and its copy moved by 1 in one
    coordinate (two codes at exactly the same distance). A code near the middle repeats
    code 0 exactly. At most 8 significant bits per value: exact in bf16, fp16 and tf32."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(-8, 9, (K, d), generator=g).float()
    codebook[K // 2] = codebook[0]
    pairs = torch.arange(0, K // 2 - 1, 2)
    codebook[pairs + 1] = codebook[pairs]
    codebook[pairs + 1, 0] += 1
    truth = torch.randint(K, (N,), generator=g)
    z = codebook[truth] + torch.randint(-8, 9, (N, d), generator=g).float() / 16
    mid = torch.arange(0, N, 5)
    z[mid] = codebook[pairs[mid % len(pairs)]]
    z[mid, 0] += 0.5
    return z.to(DEVICE, DTYPES[zt]), codebook.to(DEVICE, DTYPES[ct])


def _each_config(monkeypatch, launch):
    """launch() once per pinned config -> [(config, outputs)]."""
    out = []
    for i, config in enumerate(search_module.SEARCH_CONFIGS):
        monkeypatch.setenv(search_module.PIN_ENV, str(i))
        out.append((config, launch()))
    monkeypatch.delenv(search_module.PIN_ENV)
    return out


def _exact_nearest(z, codebook):
    """Lowest-index nearest code and its distance, in fp64 (exact on these data)."""
    dist = ((z.double().cpu()[:, None, :] - codebook.double().cpu()[None]) ** 2).sum(-1)
    best = dist.min(dim=1, keepdim=True).values
    # argmax of the first True: the lowest index among the exact minima.
    idx = (dist == best).int().argmax(dim=1)
    return idx, best.squeeze(1)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_config_gives_the_exact_codes(mode, monkeypatch):
    zt, ct, d, knobs = MODES[mode]
    z, codebook = _exact_data(zt, ct, d, seed=len(mode))
    want_idx, want_dist = _exact_nearest(z, codebook)
    assert (want_dist > 0).all() and len(set(want_idx.tolist())) > K // 10  # no row sits on a code; many codes used

    def launch():
        idx, dist, q = _poisoned(N, d, z.dtype)
        tk.launch_search(z, codebook, idx, dist, q, **knobs)
        return idx.cpu(), dist.cpu(), q.cpu()

    z64, cb64 = z.double().cpu(), codebook.double().cpu()
    for config, (idx, dist, q) in _each_config(monkeypatch, launch):
        assert ((idx >= 0) & (idx < K)).all(), f"config {config}: an index out of range"
        # The chosen code's exact distance is the exact minimum: a tie may go either way.
        wrong = (((z64 - cb64[idx]) ** 2).sum(-1) != want_dist).nonzero().flatten()
        assert not len(wrong), f"config {config}: {len(wrong)} rows off the exact nearest code, e.g. row " \
                               f"{wrong[0].item()}: {idx[wrong[0]].item()} for {want_idx[wrong[0]].item()}"
        # Code K // 2 is an exact copy of code 0: identical codes go to the lowest index.
        assert not (idx == K // 2).any(), f"config {config}: the copy of code 0 won over it"
        if not tk.centred_ranking(z.device, z.dtype, codebook.dtype):
            # 16-bit dots rank in the origin's frame, exactly on these data: the lowest index.
            assert torch.equal(idx, want_idx), f"config {config}: an exact tie not resolved to the lowest index"
        # Exact sums: bitwise the fp64 value (an ulp apart would already be a different kernel).
        assert torch.equal(dist.double(), want_dist), f"config {config}: distances differ"
        assert torch.equal(q, codebook.cpu()[idx].to(z.dtype)), f"config {config}: quantized != codebook[indices]"


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_every_config_draws_the_same_samples(cosine, monkeypatch):
    # Gumbel-max sampling: the noise is keyed by (seed, row * K + code) and the scores
    # are exact, so every tile shape must draw the same code for every row.
    z, codebook = _exact_data("bf16", "bf16", 20, seed=3)

    def launch():
        idx, dist, q = _poisoned(N, 20, z.dtype)
        tk.launch_sample(z, codebook, idx, dist, q, 0.5, 1234, cosine)
        return idx.cpu(), dist.cpu()

    runs = _each_config(monkeypatch, launch)
    first_idx, first_dist = runs[0][1]
    assert ((first_idx >= 0) & (first_idx < K)).all()
    assert len(set(first_idx.tolist())) > 1
    for config, (idx, dist) in runs[1:]:
        assert torch.equal(idx, first_idx), f"config {config} drew other codes than {runs[0][0]}"
        assert torch.equal(dist, first_dist), f"config {config}: distances differ"


@pytest.mark.parametrize("zt,ct", [("fp32", "fp32"), ("bf16", "bf16")])
def test_every_config_on_random_data(zt, ct, monkeypatch):
    # Real-valued data, rounded in the kernels: the precision policy holds for each config.
    g = torch.Generator().manual_seed(7)
    z = torch.randn(N, 24, generator=g).to(DEVICE, DTYPES[zt])
    codebook = torch.randn(K, 24, generator=g).to(DEVICE, DTYPES[ct])

    def launch():
        idx, dist, q = _poisoned(N, 24, z.dtype)
        tk.launch_search(z, codebook, idx, dist, q)
        return idx, dist

    for config, (idx, dist) in _each_config(monkeypatch, launch):
        try:
            assert_nearest(z.float(), codebook.float(), idx, dist)
        except AssertionError as exc:
            raise AssertionError(f"config {config}: {exc}") from None


def test_pin_refuses_a_config_that_does_not_exist(monkeypatch):
    z, codebook = _exact_data("fp32", "fp32", 4, seed=1)
    monkeypatch.setenv(search_module.PIN_ENV, str(len(search_module.SEARCH_CONFIGS)))
    with pytest.raises(ValueError, match=search_module.PIN_ENV):
        tk.launch_search(z, codebook, *_poisoned(N, 4, z.dtype))
