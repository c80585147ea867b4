"""Functional API: validate inputs once -> pick the backend -> call the registered op."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, backends

METRICS = ("l2", "cosine")


class QuantizeOutput(NamedTuple):
    """Outputs of :func:`quantize`.

    quantized: z's shape and dtype, ``codebook[indices]`` forward, straight-through backward.
    indices: int64, z's leading shape. loss, commitment_loss, codebook_loss: fp32 scalars.
    """
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor


def _check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, float16, bfloat16), got {t.dtype}")


def check_inputs(z, codebook, metric: str = "l2") -> None:
    """Raise a clear error naming the argument when z (..., D) or codebook (K, D) is wrong."""
    _check_float("z", z)
    _check_float("codebook", codebook)
    if z.dim() < 1:
        raise ValueError("z must have shape (..., D) with at least 1 dimension, got a 0-d tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError("codebook must hold at least one code (K >= 1), got K = 0")
    if codebook.shape[1] < 1:
        raise ValueError("codebook must have D >= 1 columns, got D = 0")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z's last dimension ({z.shape[-1]}) must equal the codebook's D ({codebook.shape[1]})")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got z on {z.device} "
                         f"and codebook on {codebook.device}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def check_finite(name: str, value) -> float:
    """A finite real number, or a ValueError naming the argument."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _prepare(z: Tensor, codebook: Tensor, metric: str, backend: str, sampling: bool = False):
    check_inputs(z, codebook, metric)
    name = backends.resolve(backend, z.device, z.dtype, codebook.dtype, metric, sampling)
    flat = z.reshape(-1, codebook.shape[1])
    if metric == "cosine":
        # Nearest unit vector in L2 is the largest cosine: |a - b|^2 = 2 - 2 cos(a, b).
        # The unit vectors stay in fp32: rounded back to fp16/bf16 they would rank codes
        # by rounded vectors (the chosen code's 1 - cos exceeded the best by up to 2e-3
        # with bf16 inputs) and return 1 - cos off by as much.
        flat = F.normalize(flat.float(), dim=1)
        codebook = F.normalize(codebook.float(), dim=1)
    return flat.contiguous(), codebook.contiguous(), name


def nearest_code(z: Tensor, codebook: Tensor, *, metric: str = "l2", backend: str = "auto"):
    """Nearest code of every row of z.

    Args:
        z: (..., D) float32/float16/bfloat16.
        codebook: (K, D) float (may differ in dtype from z).
        metric: "l2" (squared Euclidean) or "cosine" (largest cosine similarity).
        backend: "auto", "triton", "cuda", "torch" or "reference".
    Returns:
        (indices, distances): int64 and float32, both of shape z.shape[:-1]. For "l2"
        distances are sum((z - e)^2) computed from the residual in fp32; for
        "cosine" they are 1 - cos(z, e). The index is the nearest code up to the
        search's precision bound (docs/precision.md, backends.centred_ranking):
        identical codes resolve to the lowest index; codes whose distances differ by
        less than the bound may be chosen either way.
    """
    flat, cb, name = _prepare(z, codebook, metric, backend)
    with torch.no_grad():
        indices, distances, _ = _library.search(flat, cb, name)
    if metric == "cosine":
        distances = distances * 0.5
    lead = z.shape[:-1]
    return indices.reshape(lead), distances.reshape(lead)


def sample_code(z: Tensor, codebook: Tensor, temperature: float, *, metric: str = "l2",
                seed: int | None = None, backend: str = "auto"):
    """A code per row of z drawn from softmax(logit / temperature), without an N x K matrix.

    The logits are those of vector-quantize-pytorch's ``stochastic_sample_codes``:
    ``-|z - e|`` (the Euclidean distance, not squared) for "l2", the cosine similarity for
    "cosine". The draw is the Gumbel-max trick inside the search: on the Triton backend
    the fused kernel adds Philox noise of (seed, row * K + code) to each tile's logits
    (the same draw whatever the tiling or split); the torch and reference backends draw
    the noise with a torch.Generator seeded with ``seed``, one tile at a time. The cuda
    backend has no sampler: it samples with the Triton kernel on CUDA tensors.

    Args:
        z: (..., D) float; codebook: (K, D) float.
        temperature: T > 0 (a float).
        seed: int seed of the noise; None draws one from torch's default CPU generator
            (so ``torch.manual_seed`` makes it reproducible; no device sync).
    Returns:
        (indices int64, distances float32), both of shape z.shape[:-1]; distances as
        ``nearest_code``'s (of the drawn code).
    """
    temperature = check_finite("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    flat, cb, name = _prepare(z, codebook, metric, backend, sampling=True)
    with torch.no_grad():
        indices, distances, _ = _library.sample(flat, cb, 1.0 / temperature, seed, metric == "cosine", name)
    if metric == "cosine":
        distances = distances * 0.5
    lead = z.shape[:-1]
    return indices.reshape(lead), distances.reshape(lead)


def quantize(z: Tensor, codebook: Tensor, *, beta: float = 0.25, metric: str = "l2",
             backend: str = "auto") -> QuantizeOutput:
    """Vector-quantize z against codebook with the straight-through estimator.

    Args:
        z: (..., D) float; gradients reach it straight through ``quantized`` and
            from ``beta * commitment_loss``.
        codebook: (K, D) float; gradients reach it only through ``codebook_loss``.
        beta: commitment weight (0.25 in the VQ-VAE paper).
    Returns:
        QuantizeOutput(quantized (..., D) in z's dtype, indices int64 (...,),
        loss, commitment_loss, codebook_loss fp32 scalars), where both loss terms
        are the mean over elements of (z - e)^2 (of the normalized vectors for
        metric="cosine") and loss = codebook_loss + beta * commitment_loss.
    """
    beta = check_finite("beta", beta)
    flat, cb, name = _prepare(z, codebook, metric, backend)
    quantized, indices, commitment_loss, codebook_loss = _library.quantize(flat, cb, name)
    return QuantizeOutput(
        quantized.to(z.dtype).reshape(z.shape),
        indices.reshape(z.shape[:-1]),
        codebook_loss + beta * commitment_loss,
        commitment_loss,
        codebook_loss,
    )


def segment_sum(indices: Tensor, values: Tensor, num_codes: int, *, backend: str = "auto",
                deterministic: bool | None = None):
    """Per-code counts and row sums: the codebook gradient's and EMA update's statistics.

    Args:
        indices: (N,) int64 code indices in [0, num_codes).
        values: (N, D) float rows to sum per code.
        num_codes: K.
        deterministic: bitwise-reproducible reduction; defaults to
            ``torch.are_deterministic_algorithms_enabled()``.
    Returns:
        (counts (K,), sums (K, D)), both float32.
    """
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise TypeError("indices must be a 1-D int64 tensor")
    _check_float("values", values)
    if values.dim() != 2 or values.shape[0] != indices.shape[0]:
        raise ValueError(f"values must have shape (N, D) with N = len(indices) = {indices.shape[0]}, "
                         f"got {tuple(values.shape)}")
    if values.device != indices.device:
        raise ValueError(f"indices and values must be on the same device, got {indices.device} and {values.device}")
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(f"indices must lie in [0, num_codes) = [0, {num_codes})")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    name = backends.resolve(backend, values.device, values.dtype, values.dtype, "l2")
    return _library.segment_sum(indices, values.contiguous(), num_codes, name, bool(deterministic))
