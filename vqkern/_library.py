"""torch.library registrations: the custom ops, their fake kernels and autograd.

Each op body allocates its outputs and hands them to the chosen backend's
launcher; inputs arrive validated and contiguous from ``vqkern.functional``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends


def _search_outputs(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = z.shape[0]
    return (
        z.new_empty((n,), dtype=torch.int64),
        z.new_empty((n,), dtype=torch.float32),
        z.new_empty(z.shape),
    )


@torch.library.custom_op("vqkern::search", mutates_args=())
def search(z: Tensor, codebook: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(indices int64 (N,), distances fp32 (N,), quantized (N, D) in z's dtype)."""
    indices, distances, quantized = _search_outputs(z)
    if z.shape[0] > 0:
        backends.get(backend).search(z, codebook, indices, distances, quantized)
    return indices, distances, quantized


@search.register_fake
def _(z, codebook, backend):
    return _search_outputs(z)


@torch.library.custom_op("vqkern::quantize", mutates_args=())
def quantize(z: Tensor, codebook: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(quantized (N, D), indices (N,), commitment_loss (), codebook_loss ()).

    Both losses are mean((z - e)^2) in fp32 in the forward pass; they differ only
    in where their gradients go (z for the commitment term, the codebook for the
    codebook term).
    """
    indices, distances, quantized = _search_outputs(z)
    n, d = z.shape
    if n > 0:
        backends.get(backend).search(z, codebook, indices, distances, quantized)
        loss = distances.sum() / (n * d)
    else:
        loss = torch.zeros((), dtype=torch.float32, device=z.device)
    return quantized, indices, loss, loss.clone()


@quantize.register_fake
def _(z, codebook, backend):
    indices, _, quantized = _search_outputs(z)
    loss = z.new_empty((), dtype=torch.float32)
    return quantized, indices, loss, z.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vqkern::grad_z", mutates_args=())
def grad_z(grad_quantized: Tensor, z: Tensor, codebook: Tensor, indices: Tensor,
           grad_commitment: Tensor, backend: str) -> Tensor:
    """grad_quantized + 2 * grad_commitment / (N*D) * (z - codebook[indices]), in z's dtype."""
    out = torch.empty_like(z)
    n, d = z.shape
    if n > 0:
        # One host read of a scalar per backward; the launchers take a float scale.
        scale = 2.0 * float(grad_commitment) / (n * d)
        backends.get(backend).grad_z(grad_quantized, z, codebook, indices, scale, out)
    return out


@grad_z.register_fake
def _(grad_quantized, z, codebook, indices, grad_commitment, backend):
    return torch.empty_like(z)


@torch.library.custom_op("vqkern::segment_sum", mutates_args=())
def segment_sum(indices: Tensor, values: Tensor, num_codes: int, backend: str,
                deterministic: bool) -> tuple[Tensor, Tensor]:
    """(counts fp32 (K,), sums fp32 (K, D)): per-code row counts and row sums of values."""
    counts = values.new_zeros((num_codes,), dtype=torch.float32)
    sums = values.new_zeros((num_codes, values.shape[1]), dtype=torch.float32)
    if indices.shape[0] > 0:
        backends.get(backend).segment_sum(indices, values, counts, sums, deterministic)
    return counts, sums


@segment_sum.register_fake
def _(indices, values, num_codes, backend, deterministic):
    return (values.new_empty((num_codes,), dtype=torch.float32),
            values.new_empty((num_codes, values.shape[1]), dtype=torch.float32))


def _quantize_setup_context(ctx, inputs, output):
    z, codebook, backend = inputs
    _, indices, _, _ = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.backend = backend


def _quantize_backward(ctx, grad_quantized, grad_indices, grad_commitment, grad_codebook_loss):
    z, codebook, indices = ctx.saved_tensors
    n, d = z.shape
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_z_out = grad_codebook = None
    if ctx.needs_input_grad[0]:
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(z)
        if grad_commitment is None:
            grad_commitment = z.new_zeros((), dtype=torch.float32)
        grad_z_out = grad_z(grad_quantized.contiguous(), z, codebook, indices, grad_commitment, ctx.backend)
    if ctx.needs_input_grad[1]:
        if grad_codebook_loss is None or n == 0:
            grad_codebook = torch.zeros_like(codebook)
        else:
            # d/de_k of mean((sg[z] - e)^2) = 2/(N*D) * (count_k * e_k - sum_{i: idx_i = k} z_i)
            counts, sums = segment_sum(indices, z, codebook.shape[0], ctx.backend, deterministic)
            scale = grad_codebook_loss * (2.0 / (n * d))
            # In place in the fresh sums (no (K, D) temporaries): scale * (count * e - sums).
            grad_codebook = sums.mul_(-scale).addcmul_(counts.mul_(scale).unsqueeze(1), codebook.float())
            grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z_out, grad_codebook, None


quantize.register_autograd(_quantize_backward, setup_context=_quantize_setup_context)
