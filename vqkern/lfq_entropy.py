"""The entropy terms of lookup-free quantization (LFQ, MAGVIT-v2), exact and streamed.

LFQ's codes are the 2^d sign patterns c in {-s, +s}^d, and its auxiliary loss needs,
for each row x, the distribution softmax_c(2 inv_T x . c) over all 2^d codes: its
entropy per row, and the average of the distributions over the batch. Formed as an
(N, 2^d) matrix that is 17 GB of fp32 at 2^18 codes and 16,384 rows. It never is here:

- the logit is a sum over features, so the distribution is a product of d two-way
  softmaxes, p_c = prod_j sigmoid(+-a_j) with a_j = 4 inv_T s x_j;
- split the d bits into a high half (h) and a low half (l): p_(h,l) = P_H[h] * P_L[l],
  two tables of 2^(d/2) entries per row, built as products of probabilities (and their
  logarithms as sums of log-sigmoids, all of one sign: no cancellation, no underflow
  before the value itself underflows);
- the batch sum of the distributions is sum_i P_H,i^T P_L,i, a matrix product over
  the rows, accumulated row block by row block into a (C, 2^d) buffer;
- the per-row entropy keeps vector-quantize-pytorch's definition exactly,
  ``-sum_c p_c log(max(p_c, eps))`` (the clamp matters: at 2^18 codes the uniform
  probability is below eps = 1e-5), an O(2^d) sum per row over the same two tables;
- the backward streams the same way (two matrix products against the gradient of
  the sum and one more pass for the entropy), so nothing N x 2^d is saved either.

Memory: O(N d + C 2^d) plus one tile; work O(N C 2^d), the same order as the loss's
definition. ``lfq_entropy`` is the public function; ``torch.ops.vqkern.lfq_entropy``
and ``lfq_entropy_backward`` are the registered ops (fake kernels and autograd below).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from .functional import check_finite

MAX_BITS = 24  # 2^24 codes: a 64 MB fp32 sum buffer per codebook


class LFQEntropy(NamedTuple):
    """Outputs of :func:`lfq_entropy`.

    entropy: (N, C) fp32, each row's entropy over its codebook's 2^d codes (with the eps clamp).
    prob_sum: (C, 2^d) fp32, the sum over the N rows of each row's distribution.
    """
    entropy: Tensor
    prob_sum: Tensor


def _outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, d = x.shape
    return (x.new_empty((n, c), dtype=torch.float32), x.new_empty((c, 1 << d), dtype=torch.float32))


@torch.library.custom_op("vqkern::lfq_entropy", mutates_args=())
def lfq_entropy_op(x: Tensor, scale: float, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """(entropy fp32 (N, C), prob_sum fp32 (C, 2^d)) of x fp32 (N, C, d), per-bit logit a = scale * x."""
    entropy, prob_sum = _outputs(x)
    prob_sum.zero_()
    if x.shape[0] > 0:
        backends.get(backend).lfq_entropy(x, scale, eps, entropy, prob_sum)
    return entropy, prob_sum


@lfq_entropy_op.register_fake
def _(x, scale, eps, backend):
    return _outputs(x)


@torch.library.custom_op("vqkern::lfq_entropy_backward", mutates_args=())
def lfq_entropy_backward_op(x: Tensor, grad_entropy: Tensor | None, grad_prob_sum: Tensor | None,
                            scale: float, eps: float, backend: str) -> Tensor:
    """grad_x fp32 (N, C, d) from the gradients of entropy (N, C) and prob_sum (C, 2^d) (None: zero)."""
    grad_x = torch.empty_like(x)
    if x.shape[0] > 0:
        backends.get(backend).lfq_entropy_backward(x, scale, eps, grad_entropy, grad_prob_sum, grad_x)
    return grad_x


@lfq_entropy_backward_op.register_fake
def _(x, grad_entropy, grad_prob_sum, scale, eps, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, scale, eps, backend = inputs
    ctx.save_for_backward(x)
    ctx.cfg = (scale, eps, backend)
    # A term left out of the loss arrives as None: its pass is skipped.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_entropy, grad_prob_sum):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_entropy is None and grad_prob_sum is None):
        return None, None, None, None
    scale, eps, backend = ctx.cfg
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    grad_prob_sum = None if grad_prob_sum is None else grad_prob_sum.float().contiguous()
    return lfq_entropy_backward_op(x, grad_entropy, grad_prob_sum, scale, eps, backend), None, None, None


lfq_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def check_lfq_entropy_inputs(x, inv_temperature, code_scale, eps) -> tuple[float, float, float]:
    """Raise an error naming the argument; return (inv_temperature, code_scale, eps) as floats."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (N, C, d) (rows, codebooks, bits), got {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError("x must hold at least one codebook (C >= 1), got C = 0")
    if not 1 <= x.shape[2] <= MAX_BITS:
        raise ValueError(f"x's last dimension d (log2 of the codebook size) must lie in [1, {MAX_BITS}], "
                         f"got {x.shape[2]}")
    inv_temperature = check_finite("inv_temperature", inv_temperature)
    code_scale = check_finite("code_scale", code_scale)
    eps = check_finite("eps", eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return inv_temperature, code_scale, eps


def lfq_entropy(x: Tensor, *, inv_temperature: float = 100.0, code_scale: float = 1.0, eps: float = 1e-5,
                backend: str = "auto") -> LFQEntropy:
    """Per-row entropy and batch sum of LFQ's code distribution, exact, never N x 2^d.

    Args:
        x: (N, C, d) float (any float dtype; computed in fp32, gradient returned in x's
            dtype): N rows for each of C codebooks of 2^d codes.
        inv_temperature: the distribution is softmax over codes of ``2 inv_temperature x . c``.
        code_scale: the codes are {-code_scale, +code_scale}^d (vector-quantize-pytorch's
            ``codebook_scale``; ``codebook_scale / sqrt(d)`` for its spherical codes).
        eps: the entropy is ``-sum_c p_c log(max(p_c, eps))``, vector-quantize-pytorch's.
        backend: "auto", "cuda" (runs the Triton kernels), "triton", "torch" (on CPU the
            fused C++ kernel of vqkern._cpu when built, else tiled PyTorch) or "reference"
            (the plain N x 2^d computation).

    Returns:
        :class:`LFQEntropy` ``(entropy (N, C) fp32, prob_sum (C, 2^d) fp32)``; code index
        ``sum_j [x_j's code is +s] 2^(d-1-j)`` (the first feature is the most
        significant bit). Both are differentiable with respect to x.
    """
    inv_temperature, code_scale, eps = check_lfq_entropy_inputs(x, inv_temperature, code_scale, eps)
    name = backends.resolve(backend, x.device)
    xf = x.float().contiguous()
    entropy, prob_sum = lfq_entropy_op(xf, 4.0 * inv_temperature * code_scale, eps, name)
    return LFQEntropy(entropy, prob_sum)


def code_bits(d: int, device=None) -> Tensor:
    """int64 tensor of shape (K, d), K = 2^d: the bits of every code, the first feature the most significant."""
    return (torch.arange(1 << d, device=device)[:, None] >> torch.arange(d - 1, -1, -1, device=device)) & 1


def lfq_entropy_dense(x: Tensor, scale: float, eps: float) -> tuple[Tensor, Tensor]:
    """The plain computation in x's dtype: (N, C, 2^d) logits, softmax, entropy and sum.

    x (N, C, d), per-bit logit difference ``scale * x`` (= 4 inv_T s x). Memory N x C x 2^d:
    the tests' fp64 oracle and the "reference" backend."""
    d = x.shape[-1]
    signs = code_bits(d, x.device).to(x.dtype) * 2 - 1
    # Code c's logit is 2 inv_T s x . sign(c) = (scale / 2) x . sign(c).
    prob = torch.einsum("ncd,kd->nck", x * (scale / 2), signs).softmax(dim=-1)
    entropy = -(prob * prob.clamp(min=eps).log()).sum(-1)
    return entropy, prob.sum(0)
