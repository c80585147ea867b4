"""Backend registry: name -> (available?, reason, implementation).

Every backend is a module that exposes the same three launchers. None of them
validates its inputs (``vqkern.functional`` does that once) and each writes into
outputs it is given:

``search(z, codebook, indices, distances, quantized)``
    z (N, D) contiguous float, codebook (K, D) contiguous float (dtypes may
    differ), N >= 1, K >= 1. Writes indices (N,) int64 (nearest code, lowest
    index on ties), distances (N,) float32 (``sum((z - e_k)^2)`` in fp32 from
    the residual) and quantized (N, D) in z's dtype (``codebook[indices]``).

``backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic)``
    The straight-through backward in one pass over the rows: the residual
    ``z_i - e_{idx_i}`` is formed once per element in fp32 and gives both
    ``grad_z = grad_quantized + scale * (z - codebook[indices])`` (written in z's
    dtype; ``grad_z`` None: skipped) and ``diff_sums[k] += sum_{i: idx_i = k}
    (e_k - z_i)`` (``diff_sums`` (K, D) float32, zero-filled by the caller; None:
    skipped), the codebook gradient's statistic. ``scale`` is a float32 tensor of
    shape (1,) on z's device (read on the device: no host sync). ``deterministic=True``
    must give bitwise-identical ``diff_sums`` for identical inputs.

``segment_sum(indices, values, counts, sums, deterministic)``
    indices (N,) int64 in [0, K), values (N, D) float. counts (K,) float32 and
    sums (K, D) float32 are zero-filled by the caller; the launcher adds
    ``counts[k] += #{i: idx_i = k}`` and ``sums[k] += sum_{i: idx_i = k} values_i``
    in fp32. ``deterministic=True`` must give bitwise-identical results for
    identical inputs.

``sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized)``
    (optional: the cuda backend has none) writes, like ``search``, a code per row drawn
    from softmax(logit / T) (``inv_temperature`` = 1 / T, a float), logit ``-|z - e|``
    or, with ``cosine``, ``z . e`` of unit rows, with noise derived from the int ``seed``.

``lfq_entropy(x, scale, eps, entropy, prob_sum)`` and ``lfq_entropy_backward(x, scale, eps,
grad_entropy, grad_prob_sum, grad_x)``
    LFQ's entropy terms (``vqkern.lfq_entropy``): x (N, C, d) fp32 contiguous, per-bit
    logit ``scale * x``; writes entropy (N, C) fp32 and adds the rows' code distributions
    into prob_sum (C, 2^d) fp32 (zero-filled by the caller); the backward writes grad_x
    (N, C, d) fp32 from grad_entropy (N, C) and grad_prob_sum (C, 2^d) (either None: zero).
    The cuda backend runs the Triton kernels for these.

A backend module also exposes ``availability(device) -> (bool, reason)``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# Order matters for "auto": the first backend that can run on the device wins.
_MODULES = {
    "cuda": "vqkern.backends.cuda",
    "triton": "vqkern.backends.triton",
    "torch": "vqkern.backends.torch_",
    "reference": "vqkern.backends.reference",
}
BACKENDS = tuple(_MODULES)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def availability(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and why not if it cannot."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    try:
        return _load(name).availability(torch.device(device))
    except Exception as exc:  # a failure to load is the reason, reported, never swallowed
        return False, f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"



# Under torch.compile the choice is made once at trace time and kept as a constant
# (import machinery and os.environ cannot be traced).
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` (or ``VQKERN_BACKEND``) into a concrete backend name.

    ``auto`` falls back quietly to the first backend that can run on the device;
    an explicit choice that cannot run raises with the reason.
    """
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get("VQKERN_BACKEND", "auto") or "auto"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if availability(candidate, device)[0]:
                return candidate
        return "torch"
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    return name


def get(name: str) -> ModuleType:
    """The implementation module of a concrete backend name."""
    return _load(name)


def report(device: torch.device | str = "cpu") -> dict[str, tuple[bool, str]]:
    """Availability of every backend on ``device``: name -> (available, reason)."""
    return {name: availability(name, device) for name in BACKENDS}
