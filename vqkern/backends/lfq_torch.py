"""LFQ entropy in tiled PyTorch (any device), and its dispatch to vqkern._cpu on CPU.

The math is in ``vqkern.lfq_entropy``: each row's distribution over the 2^d codes is
P_H[h] * P_L[l], two half tables of 2^(d/2) entries, so the batch sum of the
distributions is a matrix product over the rows, and the per-row entropy a sum over
the (h, l) grid. Rows go in chunks whose (chunk x C x 2^d) elementwise tile stays
under ``VQKERN_TORCH_BLOCK_BYTES`` (64 MB by default), so memory never grows with N x 2^d.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _torch_backend():
    # torch_ re-exports this module's launchers, so it is imported at call time.
    from . import torch_
    return torch_


def split_bits(d: int) -> tuple[int, int]:
    """(high bits, low bits) of a d-bit code: the high half indexes P_H, the low half P_L."""
    return d // 2, d - d // 2


def half_tables(a: Tensor, start: int, bits: int) -> tuple[Tensor, Tensor]:
    """float32 probability and log-probability tables (..., 2^bits) of the bits [start, start + bits)
    of per-bit logits a (..., d): entry t is the product over those bits (the first the
    most significant) of sigmoid(a_j) where t's bit is 1, sigmoid(-a_j) where it is 0.
    Built by doubling: products of numbers in [0, 1] and sums of log-sigmoids, all of
    one sign, so each entry is accurate to about ``bits`` roundings."""
    prob = a.new_ones(a.shape[:-1] + (1,))
    logp = a.new_zeros(a.shape[:-1] + (1,))
    for j in range(start, start + bits):
        aj = a[..., j:j + 1]
        prob = torch.stack((prob * torch.sigmoid(-aj), prob * torch.sigmoid(aj)), dim=-1).flatten(-2)
        logp = torch.stack((logp + F.logsigmoid(-aj), logp + F.logsigmoid(aj)), dim=-1).flatten(-2)
    return prob, logp


def _chunk_rows(n: int, c: int, d: int) -> int:
    """Rows per chunk: one (rows, C, 2^d) fp32 tile within the block budget."""
    return max(1, min(n, _torch_backend()._block_bytes() // (4 * c * (1 << d))))


def _tables(x: Tensor, scale: float):
    dh, dl = split_bits(x.shape[-1])
    a = x * scale
    ph, lh = half_tables(a, 0, dh)
    pl, ll = half_tables(a, dh, dl)
    return a, ph, lh, pl, ll


def lfq_entropy_tiled(x: Tensor, scale: float, eps: float, entropy: Tensor, prob_sum: Tensor) -> None:
    """x (N, C, d) float32; writes entropy (N, C) fp32 and adds the distributions' sum to prob_sum (C, 2^d) fp32."""
    n, c, d = x.shape
    dh, dl = split_bits(d)
    log_eps = math.log(eps)
    sums = prob_sum.view(c, 1 << dh, 1 << dl)
    step = _chunk_rows(n, c, d)
    with _torch_backend()._ieee_fp32_matmul(x.device):
        for r0 in range(0, n, step):
            _, ph, lh, pl, ll = _tables(x[r0:r0 + step], scale)
            # sum_i P_H,i^T P_L,i for each codebook: (C, 2^dh, rows) @ (C, rows, 2^dl).
            sums.add_(torch.bmm(ph.permute(1, 2, 0), pl.permute(1, 0, 2)))
            # -sum_h P_H[h] sum_l P_L[l] max(log P_H[h] + log P_L[l], log eps).
            t = (lh.unsqueeze(-1) + ll.unsqueeze(-2)).clamp_(min=log_eps)
            inner = (t.mul_(pl.unsqueeze(-2))).sum(-1)
            entropy[r0:r0 + step] = -(ph * inner).sum(-1)


def _bit_matrix(bits: int, device) -> Tensor:
    """(2^bits, bits) fp32: entry (t, j) is bit j of t, the first the most significant."""
    return ((torch.arange(1 << bits, device=device)[:, None] >> torch.arange(bits - 1, -1, -1, device=device)) & 1
            ).float()


def lfq_entropy_backward_tiled(x: Tensor, scale: float, eps: float, grad_entropy: Tensor | None,
                               grad_prob_sum: Tensor | None, grad_x: Tensor) -> None:
    """x (N, C, d) float32; writes grad_x (N, C, d) fp32 for the gradients of entropy (N, C) and prob_sum (C, 2^d).

    With W_(h,l) = d loss / d p_(h,l) (the prob_sum gradient G minus the entropy gradient
    g times ``max(log p, log eps) + [p >= eps]``), d loss / d a_j = sigmoid(-a_j) T1_j -
    sigmoid(a_j) T0_j, T1_j (T0_j) the sum of W p over the codes whose bit j is 1 (0).
    Both sums are formed directly, never as a difference of the other from their total.
    For a high bit they are sums over h of P_H[h] * R_H[h], R_H[h] = sum_l P_L[l] W_(h,l)
    (= P_L G^T minus the entropy part); for a low bit the same with the halves swapped.
    """
    n, c, d = x.shape
    dh, dl = split_bits(d)
    log_eps = math.log(eps)
    g = None if grad_prob_sum is None else grad_prob_sum.view(c, 1 << dh, 1 << dl)
    bits_h, bits_l = _bit_matrix(dh, x.device), _bit_matrix(dl, x.device)
    step = _chunk_rows(n, c, d)
    with _torch_backend()._ieee_fp32_matmul(x.device):
        for r0 in range(0, n, step):
            a, ph, lh, pl, ll = _tables(x[r0:r0 + step], scale)
            rows = a.shape[0]
            if g is not None:
                # (C, rows, 2^dh) and (C, rows, 2^dl), then back to (rows, C, .).
                r_h = torch.bmm(pl.permute(1, 0, 2), g.transpose(1, 2)).permute(1, 0, 2)
                r_l = torch.bmm(ph.permute(1, 0, 2), g).permute(1, 0, 2)
            else:
                r_h = ph.new_zeros((rows, c, 1 << dh))
                r_l = pl.new_zeros((rows, c, 1 << dl))
            if grad_entropy is not None:
                t = lh.unsqueeze(-1) + ll.unsqueeze(-2)
                w = t.clamp(min=log_eps).add_((t >= log_eps).float())
                ge = grad_entropy[r0:r0 + rows].unsqueeze(-1)
                r_h = r_h - ge * (w * pl.unsqueeze(-2)).sum(-1)
                r_l = r_l - ge * (w.mul_(ph.unsqueeze(-1))).sum(-2)
            z_h, z_l = ph * r_h, pl * r_l
            t1 = torch.cat((z_h @ bits_h, z_l @ bits_l), dim=-1)
            t0 = torch.cat((z_h @ (1 - bits_h), z_l @ (1 - bits_l)), dim=-1)
            grad_x[r0:r0 + rows] = scale * (torch.sigmoid(-a) * t1 - torch.sigmoid(a) * t0)


def lfq_entropy(x: Tensor, scale: float, eps: float, entropy: Tensor, prob_sum: Tensor) -> None:
    """Backend launcher, x (N, C, d) float32 -> entropy (N, C), prob_sum (C, 2^d) fp32: on CPU the
    fused kernel of vqkern._cpu when it is active, else tiled PyTorch."""
    ext = _torch_backend()._active_cpu_ext()[0] if x.device.type == "cpu" else None
    if ext is not None and hasattr(ext, "lfq_entropy"):
        n, c, d = x.shape
        ext.lfq_entropy(x.data_ptr(), n, c, d, float(scale), float(eps), entropy.data_ptr(), prob_sum.data_ptr(),
                        torch.get_num_threads())
        return
    lfq_entropy_tiled(x, scale, eps, entropy, prob_sum)


def lfq_entropy_backward(x: Tensor, scale: float, eps: float, grad_entropy: Tensor | None,
                         grad_prob_sum: Tensor | None, grad_x: Tensor) -> None:
    """Backend launcher of the backward, x (N, C, d) float32 -> grad_x (N, C, d) fp32, as :func:`lfq_entropy`."""
    ext = _torch_backend()._active_cpu_ext()[0] if x.device.type == "cpu" else None
    if ext is not None and hasattr(ext, "lfq_entropy_backward"):
        n, c, d = x.shape
        ext.lfq_entropy_backward(x.data_ptr(), n, c, d, float(scale), float(eps),
                                 0 if grad_entropy is None else grad_entropy.data_ptr(),
                                 0 if grad_prob_sum is None else grad_prob_sum.data_ptr(),
                                 grad_x.data_ptr(), torch.get_num_threads())
        return
    lfq_entropy_backward_tiled(x, scale, eps, grad_entropy, grad_prob_sum, grad_x)
