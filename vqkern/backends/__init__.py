"""Backend registry: name -> (available?, reason, implementation).

Every backend is a module that exposes the same three launchers. None of them
validates its inputs (``vqkern.functional`` does that once) and each writes into
outputs it is given:

``search(z, codebook, indices, distances, quantized)``
    z (N, D) contiguous float, codebook (K, D) contiguous float (dtypes may
    differ), N >= 1, K >= 1. Writes indices (N,) int64 (the nearest code up to
    the precision bound of ``centred_ranking``: identical codes resolve to the
    lowest index, codes whose distances differ by less than the bound may be
    chosen either way), distances (N,) float32 (``sum((z - e_k)^2)`` in fp32 from
    the residual) and quantized (N, D) in z's dtype (``codebook[indices]``).

``backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic)``
    The straight-through backward in one pass over the rows: the residual
    ``z_i - e_{idx_i}`` is formed once per element in fp32 and gives both
    ``grad_z = grad_quantized + scale * (z - codebook[indices])`` (written in z's
    dtype; ``grad_z`` None: skipped) and ``diff_sums[k] += sum_{i: idx_i = k}
    (e_k - z_i)`` (``diff_sums`` (K, D) float32, zero-filled by the caller; None:
    skipped), the codebook gradient's statistic, summed per code in blocks (or in
    fp64), never as one running fp32 sum over the rows. ``scale`` is a float32 tensor of
    shape (1,) on z's device (read on the device: no host sync). ``deterministic=True``
    must give bitwise-identical ``diff_sums`` for identical inputs.

``segment_sum(indices, values, counts, sums, deterministic)``
    indices (N,) int64 in [0, K), values (N, D) float. counts (K,) float32 and
    sums (K, D) float32 are zero-filled by the caller; the launcher adds
    ``counts[k] += #{i: idx_i = k}`` and ``sums[k] += sum_{i: idx_i = k} values_i``
    in fp32, summed per code in blocks (or in fp64). ``deterministic=True`` must give
    bitwise-identical results for identical inputs.

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

A backend module also exposes ``availability(device) -> (bool, reason)``,
``centred_ranking(device, z_dtype, codebook_dtype) -> bool`` (see ``centred_ranking``), and may expose
``tiles(device, z_dtype, codebook_dtype) -> dict``: how its kernels cut the work for such
inputs (``path``, the code path they take; ``rows`` and ``codes`` of a search tile;
``split_rows`` and ``split_codes``, the search splits the codes between programs when
N <= split_rows, each split at least split_codes; ``d_block``, the widest D chunk;
``backward_rows``, the rows of a backward or atomic segment-sum block; ``piece``, the rows
of a deterministic segment-sum piece; ``sample_tiles``, the sampler shares the search's
tiles). The self-check draws shapes that cross them.

Before a backend serves a (device, z dtype, codebook dtype, metric) for the first time in
a process it passes a self-check on that device (``vqkern.check.selfcheck``): ``auto``
skips a backend that fails, with one warning, and an explicit choice raises.
``VQKERN_SELFCHECK=0`` turns the check off.
"""
from __future__ import annotations

import importlib
import os
import warnings
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
# "reference" comes last everywhere: it materializes N x K (slow, memory-hungry), but it
# is plain fp64-ranked PyTorch, so when every fused backend fails its self-check on a
# device a correct answer (with a warning) beats refusing to run.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch", "reference"), "cpu": ("torch", "reference")}
_SAMPLERS = ("triton", "torch", "reference")  # the cuda backend has no sampler
# Keys whose self-check failure "auto" has already warned about (one warning per key).
_WARNED: set = set()
REPORT_HINT = ("Please report it to the vqkern developers with the output of "
               "`python -m vqkern.check --json check.json` and that file.")


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



def _selfcheck():
    from ..check import selfcheck  # the battery imports the reference and this registry
    return selfcheck


# Under torch.compile the choice is made once at trace time and kept as a constant
# (import machinery, os.environ and the self-check's launches cannot be traced): the
# self-check of a key a compiled function meets first runs eagerly while it is traced.
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device | str, z_dtype: torch.dtype = torch.float32,
            codebook_dtype: torch.dtype | None = None, metric: str = "l2", sampling: bool = False) -> str:
    """Turn ``"auto"`` (or ``VQKERN_BACKEND``) into a concrete backend name for a call with
    z of ``z_dtype`` and a codebook of ``codebook_dtype`` (default: z's) on ``device``.

    ``auto`` falls back quietly past backends that cannot run on the device, and with one
    warning past a backend that fails its self-check for this key; when none passes, it
    raises with every reason. An explicit choice that cannot run or fails its self-check
    raises with the reason. ``sampling``: the call draws codes (``sample_code``); a backend
    without a sampler hands it to the first of triton, torch, reference that can run.
    """
    device = torch.device(device)
    codebook_dtype = z_dtype if codebook_dtype is None else codebook_dtype
    if name == "auto":
        name = os.environ.get("VQKERN_BACKEND", "auto") or "auto"
    if name != "auto":
        ok, reason = availability(name, device)
        if not ok:
            raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
        if not (sampling and not hasattr(_load(name), "sample")):
            ok, detail = _passes(name, device, z_dtype, codebook_dtype, metric)
            if not ok:
                raise RuntimeError(f"backend={name!r} failed its self-check, so vqkern will not use it: {detail}. "
                                   f"{REPORT_HINT} backend='auto' skips a backend that fails.")
            return name
    candidates = _AUTO_ORDER.get(device.type, ("torch", "reference"))
    if sampling:
        candidates = tuple(c for c in candidates if c in _SAMPLERS)
    reasons = []
    for candidate in candidates:
        ok, reason = availability(candidate, device)
        if not ok:
            reasons.append(f"{candidate}: cannot run ({reason})")
            continue
        ok, detail = _passes(candidate, device, z_dtype, codebook_dtype, metric, warn=True)
        if ok:
            return candidate
        reasons.append(f"{candidate}: {detail}")
    raise RuntimeError(f"no vqkern backend passed its self-check on {device} for z {z_dtype}, codebook "
                       f"{codebook_dtype}, metric {metric}:\n  " + "\n  ".join(reasons) + f"\n{REPORT_HINT}")


def _passes(name, device, z_dtype, codebook_dtype, metric, warn=False) -> tuple[bool, str]:
    """(passed, what failed) of the backend's self-check for this key (run now if not cached)."""
    if not _selfcheck_enabled():
        return True, ""
    selfcheck = _selfcheck()
    key, verdict = selfcheck.verdict(name, device, z_dtype, codebook_dtype, metric)
    if verdict.ok:
        return True, ""
    detail = f"{selfcheck.describe_key(key)}: {verdict.detail}"
    if warn and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"vqkern: backend {name!r} failed its self-check on {device}, so backend='auto' skips it for "
                      f"these inputs and the next backend serves. {detail}. {REPORT_HINT}", RuntimeWarning,
                      stacklevel=4)
    return False, detail


def _selfcheck_enabled() -> bool:
    return os.environ.get("VQKERN_SELFCHECK", "1").strip() != "0"


def get(name: str) -> ModuleType:
    """The implementation module of a concrete backend name."""
    return _load(name)


class BackendReport(tuple):
    """(available, reason) of a backend on a device, plus ``verdicts``: the self-check
    verdicts reached in this process on that device, a dict key -> Verdict (key: backend,
    device, z dtype, codebook dtype, metric, code path). ``reason`` ends with them."""

    def __new__(cls, available: bool, reason: str, verdicts: dict):
        self = super().__new__(cls, (available, reason))
        self.verdicts = verdicts
        return self

    @property
    def available(self) -> bool:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]


def report(device: torch.device | str = "cpu", check: bool = False) -> dict[str, BackendReport]:
    """Every backend on ``device``: name -> (available, reason) with its self-check verdicts.

    ``check=True`` first runs the self-check of each available backend for fp32 z and
    codebook with metric l2 (cached like any other). Each entry unpacks as (available,
    reason); its ``verdicts`` attribute holds the verdicts, also summed up in the reason."""
    selfcheck = _selfcheck()
    out = {}
    for name in BACKENDS:
        ok, reason = availability(name, device)
        if ok and check:
            selfcheck.verdict(name, device, torch.float32, torch.float32, "l2")
        found = {k: v for k, v in selfcheck.verdicts(device).items() if k[0] == name} if ok else {}
        if ok and not _selfcheck_enabled():
            reason += "; self-check: off (VQKERN_SELFCHECK=0)"
        elif ok and not found:
            reason += "; self-check: not yet run in this process"
        elif ok:
            reason += "; self-check: " + "; ".join(
                f"{selfcheck.describe_key(k).split(', ', 1)[1]}: {'passed' if v.ok else 'FAILED: ' + v.detail}"
                for k, v in found.items())
        out[name] = BackendReport(ok, reason, found)
    return out


def centred_ranking(name: str, device: torch.device | str, z_dtype: torch.dtype,
                    codebook_dtype: torch.dtype) -> bool:
    """Whether backend ``name``'s search of z (``z_dtype``) against a codebook
    (``codebook_dtype``) on ``device`` ranks in the frame centred on the rows (``vqkern.backends._frame``).

    True: the chosen code's exact distance exceeds the nearest by at most about
    1e-5 * (|z - c|^2 + max_k |e_k - c|^2), c the mean of the codebook, wherever the
    data sits. False (fp16/bf16 inputs multiplied as they are, on tensor cores or AMX):
    1e-5 * (|z|^2 + max_k |e_k|^2), which grows with the data's distance from the
    origin. docs/precision.md has the policy of every path. ``name`` is a concrete backend.
    """
    return bool(_load(name).centred_ranking(torch.device(device), z_dtype, codebook_dtype))

