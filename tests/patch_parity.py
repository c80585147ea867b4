"""Shared checks of the vqkern.patch tests: an original layer against its patched copy.

Every check builds the library's real class; these helpers only compare.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vqkern

from helpers import RANK_RTOL, assert_nearest, exact_distances


def patched_copy(module, **kwargs):
    """(a deep copy of module patched by vqkern.patch, what patch returned); a warning fails."""
    twin = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = vqkern.patch(twin, **kwargs)
    assert patched, f"vqkern.patch recognized nothing in {type(module).__name__}"
    return twin, patched


def assert_no_near_ties(rows, codebook, margin=2 * RANK_RTOL):
    """The data is such that any correct search picks one code: each row's two best exact
    distances differ by more than ``margin`` of |z|^2 + max|e|^2: twice the ranking error the
    precision policy allows, so any search within the policy picks the one true nearest code."""
    exact = exact_distances(rows.detach().reshape(-1, rows.shape[-1]), codebook.detach())
    if exact.shape[1] < 2:
        return
    two = exact.topk(2, dim=1, largest=False).values
    flat = rows.detach().double().reshape(-1, rows.shape[-1])
    scale = (flat ** 2).sum(1) + (codebook.detach().double() ** 2).sum(1).max()
    gap = ((two[:, 1] - two[:, 0]) / scale).min().item()
    assert gap > margin, f"test data has a near-tie ({gap:.3g} of |z|^2+|e|^2): pick another seed"


def assert_codes_agree(rows, codebook, ours, theirs):
    """Tie-aware: ours is the nearest code within the precision policy; where the original
    chose another code, its choice was a near-tie too. Returns the bool mask of rows where
    both chose the same code."""
    rows = rows.detach().reshape(-1, rows.shape[-1])
    ours, theirs = ours.reshape(-1), theirs.reshape(-1)
    assert_nearest(rows, codebook.detach(), ours)
    same = ours == theirs
    if not bool(same.all()):
        exact = exact_distances(rows[~same], codebook.detach())
        scale = (rows[~same].double() ** 2).sum(1) + (codebook.detach().double() ** 2).sum(1).max()
        gap = (exact.gather(1, theirs[~same, None]) - exact.gather(1, ours[~same, None])).abs().squeeze(1) / scale
        assert gap.max().item() <= RANK_RTOL, f"{int((~same).sum())} rows chose codes that are not near-ties"
    return same


def grad_within_twice(ours, plain, exact, floor=1e-7, what="gradient"):
    """CONVENTIONS.md: ours' max error against fp64 is at most twice plain PyTorch's (+ a floor
    for when the plain computation happens to be exact)."""
    err = (ours.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err <= 2 * err_plain + floor * max(1.0, exact.abs().max().item()), (what, err, err_plain)


def tensor_objects(module):
    """{name: the tensor object} of every parameter and buffer, for identity checks."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_state_dicts_equal(a, b):
    """Same keys, shapes, dtypes and values (bitwise)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns while active
    (the ops' own outputs: what a layer materializes, not a kernel's internal tiles)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_tensor(fn) -> tuple[int, str]:
    """(elements, op) of the largest tensor any op made while ``fn()`` ran (backward included)."""
    with LargestTensor() as mode:
        fn()
    return mode.largest, mode.op


def compare_training(layer, *, shape, call, search_space, steps=3, lr=0.5, seed=0, dtype=torch.float32,
                     scale=1.0, backend="auto"):
    """Train the original layer, its patched copy and an fp64 copy of the original on the same
    batches with the same optimizer, comparing at every step.

    call(module, z) -> (quantized, loss, indices); search_space(module, z) -> (rows (N, D),
    codebook (K, D)) as the layer searches them. The quantized output must be the original's
    bitwise where both chose the same code; the indices the fp64 original's (the data has no
    near-ties); the loss and the gradients of the input and of every parameter within twice
    the original's error in ``dtype`` against fp64; the state after training the original's.
    """
    patched, _ = patched_copy(layer, backend=backend)
    exact = copy.deepcopy(layer).double()
    layer, patched = layer.to(dtype), patched.to(dtype)
    mods = {"orig": layer, "ours": patched, "exact": exact}
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr) for k, m in mods.items()}
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        weight = torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert_no_near_ties(*search_space(exact, z))
        res = {}
        for name, module in mods.items():
            zz = z.to(torch.float64 if name == "exact" else dtype).requires_grad_()
            quantized, loss, indices = call(module, zz)
            # The loss weighted by the element count: its gradient is then as large as the
            # straight-through one instead of hiding under the tolerance.
            ((quantized * weight.to(quantized.dtype)).sum() + loss * zz.numel()).backward()
            res[name] = (quantized.detach(), loss.detach(), indices, zz.grad,
                         {n: p.grad.clone() for n, p in module.named_parameters()})
        (q_o, l_o, i_o, gz_o, gp_o), (q_k, l_k, i_k, gz_k, gp_k), (_, l_x, i_x, gz_x, gp_x) = (
            res["orig"], res["ours"], res["exact"])
        assert i_k.dtype == i_o.dtype == torch.int64 and i_k.shape == i_o.shape
        assert torch.equal(i_k, i_x), f"step {step}: {(i_k != i_x).sum()} indices differ from fp64's"
        same = i_k == i_o
        if dtype == torch.float32:
            assert bool(same.all()), f"step {step}: the fp32 original chose other codes"
        assert q_k.shape == q_o.shape and q_k.dtype == q_o.dtype
        if bool(same.all()):
            assert torch.equal(q_k, q_o), f"step {step}: quantized output differs"
        grad_within_twice(q_k, q_o, res["exact"][0], what=f"quantized at step {step}")
        assert l_k.shape == l_o.shape and l_k.dtype == l_o.dtype
        grad_within_twice(l_k, l_o, l_x, what=f"loss at step {step}")
        grad_within_twice(gz_k, gz_o, gz_x, what=f"input gradient at step {step}")
        for name in gp_o:
            grad_within_twice(gp_k[name], gp_o[name], gp_x[name], what=f"{name}.grad at step {step}")
        for opt in opts.values():
            opt.step()
            opt.zero_grad()
    ref, got, want = layer.state_dict(), patched.state_dict(), exact.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        if dtype == torch.float32:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
        grad_within_twice(got[key], ref[key], want[key], floor=1e-6, what=f"{key} after training")
    return layer, patched


def train_models_alike(model, ours, batches, loss_of, after_step=None, lr=1e-3, zero_grad_keys=()):
    """Train a whole model and its patched copy with Adam on the same batches: the same loss at
    every step (``loss_of(module, x)``), ``after_step(step)`` run after each, and the same
    weights at the end.

    ``zero_grad_keys``: parameters whose gradient is zero in exact arithmetic (an attention
    key's bias: softmax ignores a shift common to a query's scores), so what reaches them is
    rounding noise of either model, which Adam scales to steps of ``lr`` with the noise's
    sign. Their final values are not compared; their gradients are checked to be noise
    (below 1e-5 of the largest gradient of the model) at every step."""
    torch.backends.mkldnn.enabled, mkldnn = False, torch.backends.mkldnn.enabled
    try:
        # Plain convolutions: oneDNN's first call per shape costs seconds here, for 8 x 8 images.
        opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (model, ours)]
        for step, x in enumerate(batches):
            losses = []
            for m, opt in zip((model, ours), opts):
                loss = loss_of(m, x)
                opt.zero_grad()
                loss.backward()
                if zero_grad_keys:
                    grads = dict(m.named_parameters())
                    top = max(float(p.grad.abs().max()) for p in grads.values() if p.grad is not None)
                    for key in zero_grad_keys:
                        noise = float(grads[key].grad.abs().max())
                        assert noise <= 1e-5 * top, f"{key}: gradient {noise:.3g} is not rounding noise"
                opt.step()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
            if after_step is not None:
                after_step(step)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    for (key, a), (_, b) in zip(model.state_dict().items(), ours.state_dict().items()):
        if key not in zero_grad_keys:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)


def assert_no_rows_by_codes(layer, ours, z, num_codes, extra=None):
    """Forward and backward (and ``extra(module)``) of a VQGAN-style layer: the original's
    largest tensor is at least N x K, the patched layer's no larger than its input or codebook."""
    n = z.numel() // z.shape[1]

    def step(m):
        zz = z.clone().requires_grad_()
        quantized, loss = m(zz)[:2]
        (quantized.sum() + loss).backward()
        if extra is not None:
            extra(m)

    assert largest_tensor(lambda: step(layer))[0] >= n * num_codes
    size, op = largest_tensor(lambda: step(ours))
    assert size <= max(z.numel(), num_codes * z.shape[1]), (size, op)
