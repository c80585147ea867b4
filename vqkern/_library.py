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


@torch.library.custom_op("vqkern::sample", mutates_args=())
def sample(z: Tensor, codebook: Tensor, inv_temperature: float, seed: int, cosine: bool,
           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(indices int64 (N,), distances fp32 (N,), quantized (N, D)): a code per row drawn
    from softmax(logit / T), inv_temperature = 1 / T."""
    indices, distances, quantized = _search_outputs(z)
    if z.shape[0] > 0:
        backends.get(backend).sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized)
    return indices, distances, quantized


@sample.register_fake
def _(z, codebook, inv_temperature, seed, cosine, backend):
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


@torch.library.custom_op("vqkern::quantize_backward", mutates_args=())
def quantize_backward(grad_quantized: Tensor, z: Tensor, codebook: Tensor, indices: Tensor,
                      grad_commitment: Tensor, grad_codebook_loss: Tensor, backend: str,
                      need_grad_z: bool, need_grad_codebook: bool,
                      deterministic: bool) -> tuple[Tensor, Tensor]:
    """(grad_z (N, D) in z's dtype, grad_codebook (K, D) in the codebook's dtype).

    grad_z = grad_quantized + 2 * grad_commitment / (N*D) * (z - codebook[indices]);
    grad_codebook[k] = 2 * grad_codebook_loss / (N*D) * sum_{i: idx_i = k} (e_k - z_i).
    The codebook gradient sums the residuals, never ``count_k * e_k - sum z_i``: that
    difference cancels when z sits near its code or far from the origin (30 to 1000
    times plain autograd's error in fp32 with a common offset of 100). Both scales stay
    on the device (no host read, so the backward can be captured in a CUDA graph). An
    output that is not needed comes back empty, shape (0,).
    """
    n, d = z.shape
    k = codebook.shape[0]
    grad_z_out = torch.empty_like(z) if need_grad_z else z.new_empty((0,))
    diff_sums = (codebook.new_zeros((k, d), dtype=torch.float32) if need_grad_codebook
                 else codebook.new_empty((0,), dtype=torch.float32))
    inv = 2.0 / max(1, n * d)
    if n > 0 and (need_grad_z or need_grad_codebook):
        scale = (grad_commitment.float() * inv).reshape(1)
        backends.get(backend).backward(grad_quantized, z, codebook, indices, scale,
                                       grad_z_out if need_grad_z else None,
                                       diff_sums if need_grad_codebook else None, deterministic)
    if not need_grad_codebook:
        return grad_z_out, codebook.new_empty((0,))
    if n == 0:
        return grad_z_out, torch.zeros_like(codebook)
    return grad_z_out, diff_sums.mul_(grad_codebook_loss.float() * inv).to(codebook.dtype)


@quantize_backward.register_fake
def _(grad_quantized, z, codebook, indices, grad_commitment, grad_codebook_loss, backend,
      need_grad_z, need_grad_codebook, deterministic):
    return (torch.empty_like(z) if need_grad_z else z.new_empty((0,)),
            torch.empty_like(codebook) if need_grad_codebook else codebook.new_empty((0,)))


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
    # Outputs that get no gradient arrive as None, not materialized zeros: a loss term
    # left out of the graph then costs nothing and leaves its input's .grad None.
    ctx.set_materialize_grads(False)


def _quantize_backward(ctx, grad_quantized, grad_indices, grad_commitment, grad_codebook_loss):
    z, codebook, indices = ctx.saved_tensors
    # z's gradient comes through quantized and commitment_loss; without either it is None.
    need_z = ctx.needs_input_grad[0] and (grad_quantized is not None or grad_commitment is not None)
    # The codebook's gradient comes only through codebook_loss: without one it is zero (None).
    need_codebook = ctx.needs_input_grad[1] and grad_codebook_loss is not None
    if not (need_z or need_codebook):
        return None, None, None
    if grad_quantized is None:
        # Read only for grad_z; otherwise any (N, D) tensor of z's kind will do.
        grad_quantized = torch.zeros_like(z) if need_z else z
    if grad_commitment is None:
        grad_commitment = z.new_zeros((), dtype=torch.float32)
    if grad_codebook_loss is None:
        grad_codebook_loss = z.new_zeros((), dtype=torch.float32)
    grad_z_out, grad_codebook = quantize_backward(
        grad_quantized.contiguous(), z, codebook, indices, grad_commitment, grad_codebook_loss,
        ctx.backend, need_z, need_codebook, torch.are_deterministic_algorithms_enabled())
    return grad_z_out if need_z else None, grad_codebook if need_codebook else None, None


quantize.register_autograd(_quantize_backward, setup_context=_quantize_setup_context)
