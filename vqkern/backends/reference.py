"""The plain-PyTorch reference as a backend: broadcast distances, N x K in memory."""
from __future__ import annotations

import torch

from .. import reference as ref
from .._gumbel import gumbel_, logits


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch runs on every device"


def centred_ranking(device, z_dtype, codebook_dtype) -> bool:
    """The fp64 residual ranks exactly, wherever the data sits."""
    return True


def search(z, codebook, indices, distances, quantized) -> None:
    idx = ref.nearest_code(z, codebook)
    chosen = codebook[idx]
    indices.copy_(idx)
    distances.copy_(((z.float() - chosen.float()) ** 2).sum(dim=1))
    quantized.copy_(chosen)


def sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized) -> None:
    generator = torch.Generator(device=z.device)
    generator.manual_seed(int(seed))
    x = z.double()
    scores = logits(x, x.square().sum(-1), codebook.double(), cosine) * inv_temperature
    scores = scores + gumbel_(torch.empty_like(scores), generator)
    idx = scores.nan_to_num_(nan=-float("inf")).argmax(dim=1)
    chosen = codebook[idx]
    indices.copy_(idx)
    distances.copy_(((z.float() - chosen.float()) ** 2).sum(dim=1))
    quantized.copy_(chosen)


def _sums64(shape, indices, values):
    return torch.zeros(shape, dtype=torch.float64, device=values.device).index_add_(0, indices, values.double())


def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic) -> None:
    diff = codebook[indices].float() - z.float()
    if grad_z is not None:
        grad_z.copy_(grad_quantized.float() - scale * diff)
    if diff_sums is not None:
        # Summed in fp64 and rounded once: a running fp32 sum of many rows of one code
        # errs like the rows (the residuals of half-precision rows round alike).
        diff_sums.add_(_sums64(diff_sums.shape, indices, diff))


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    one_hot = torch.nn.functional.one_hot(indices, counts.shape[0]).float()
    counts.add_(one_hot.sum(dim=0))
    # Not one_hot.t() @ values: a row holding an infinity would put 0 * inf = NaN into
    # every code's sum.
    sums.add_(_sums64(sums.shape, indices, values))


def lfq_entropy(x, scale, eps, entropy, prob_sum) -> None:
    """LFQ's entropy terms from the dense (N, C, 2^d) distributions, in fp64."""
    from ..lfq_entropy import lfq_entropy_dense
    ent, sums = lfq_entropy_dense(x.double(), scale, eps)
    entropy.copy_(ent)
    prob_sum.copy_(sums)


def lfq_entropy_backward(x, scale, eps, grad_entropy, grad_prob_sum, grad_x) -> None:
    """The softmax backward through the dense fp64 (N, C, 2^d) distributions."""
    from ..lfq_entropy import code_bits
    x64 = x.double()
    signs = code_bits(x.shape[-1], x.device).double() * 2 - 1
    prob = torch.einsum("ncd,kd->nck", x64 * (scale / 2), signs).softmax(dim=-1)
    grad_p = torch.zeros_like(prob)
    if grad_entropy is not None:
        # d/dp of -p log(max(p, eps)): -(log(max(p, eps)) + [p >= eps]).
        dent = prob.clamp(min=eps).log() + (prob >= eps).double()
        grad_p -= grad_entropy.double().unsqueeze(-1) * dent
    if grad_prob_sum is not None:
        grad_p += grad_prob_sum.double().unsqueeze(0)
    grad_logit = prob * (grad_p - (prob * grad_p).sum(-1, keepdim=True))
    grad_x.copy_(torch.einsum("nck,kd->ncd", grad_logit, signs) * (scale / 2))
