"""LFQ's entropy terms in Triton: the batch sum of the code distributions, each row's
entropy, and their backward, never an N x 2^d tensor (vqkern/lfq_entropy.py has the math).

Every kernel rebuilds the half tables it needs from x on the fly: a (rows x table
entries) tile of P_H (or P_L) is the product over the d/2 bits of sigmoid(+-a_j),
its log the sum of log-sigmoids. Then:

- ``_sums_kernel``, one program per (h block, l block, codebook) tile of the (C, 2^d)
  sum: P_H^T @ P_L accumulated over all rows with ``tl.dot`` in full fp32 (no TF32),
  no atomics, so the result does not depend on the launch;
- ``_entropy_kernel``, one program per (row block, codebook): the (rows, h, l) grid of
  ``P_H P_L max(log P_H + log P_L, log eps)`` summed tile by tile;
- ``_backward_kernel``, one program per (row block, codebook): for the high bits,
  R_H = P_L G^T (``tl.dot``) minus the entropy gradient times sum_l P_L w, then the
  bit sums of P_H R_H; the same with the halves swapped for the low bits.

The "cuda" backend runs these kernels too (there is no CUDA C++ kernel for this op).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import on_device


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1], accurate to a few ulps without a log1p instruction:
    log(u) * e / (u - 1) with u = 1 + e rounded (Goldberg); e itself when u rounds to 1."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _bit_factors(a):
    """sigmoid(-a), sigmoid(a), log sigmoid(-a), log sigmoid(a) in fp32."""
    e = tl.exp(-tl.abs(a))
    big = 1.0 / (1.0 + e)  # sigmoid(|a|)
    small = e * big  # sigmoid(-|a|), exact for large |a| (1 - big would cancel)
    pos = a >= 0
    p1 = tl.where(pos, big, small)
    p0 = tl.where(pos, small, big)
    soft = _log1p(e)
    l1 = tl.minimum(a, 0.0) - soft
    l0 = tl.minimum(-a, 0.0) - soft
    return p0, p1, l0, l1


@triton.jit
def _table(x_ptr, rows, row_mask, cb, C, scale, idx, START: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """(BLOCK_R, BLOCK_T) tables of the bits [START, START + BITS) of x's rows: probability
    (product of sigmoids, the first bit most significant) and its log (sum of log-sigmoids)
    at table entries idx; rows outside row_mask get probability 0."""
    prob = tl.full((BLOCK_R, BLOCK_T), 1.0, dtype=tl.float32)
    logp = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(BITS):
        a = tl.load(x_ptr + (rows * C + cb) * D + START + j, mask=row_mask, other=0.0) * scale
        p0, p1, l0, l1 = _bit_factors(a)
        bit = ((idx >> (BITS - 1 - j)) & 1)[None, :] != 0
        prob = prob * tl.where(bit, p1[:, None], p0[:, None])
        logp = logp + tl.where(bit, l1[:, None], l0[:, None])
    prob = tl.where(row_mask[:, None], prob, 0.0)
    return prob, logp


@triton.jit
def _sums_kernel(x_ptr, out_ptr, N, C, scale, D: tl.constexpr, DH: tl.constexpr, DL: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_l = tl.program_id(1)
    cb = tl.program_id(2).to(tl.int64)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ls = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = rows < N
        ph, _ = _table(x_ptr, rows, row_mask, cb, C, scale, hs, 0, DH, D, BLOCK_R, BLOCK_H)
        pl, _ = _table(x_ptr, rows, row_mask, cb, C, scale, ls, DH, DL, D, BLOCK_R, BLOCK_L)
        acc += tl.dot(tl.trans(ph), pl, input_precision="ieee")
    mask = (hs[:, None] < (1 << DH)) & (ls[None, :] < (1 << DL))
    tl.store(out_ptr + cb * (1 << D) + hs[:, None] * (1 << DL) + ls[None, :], acc, mask=mask)


@triton.jit
def _entropy_kernel(x_ptr, out_ptr, N, C, scale, log_eps, D: tl.constexpr, DH: tl.constexpr, DL: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for l0 in range(0, 1 << DL, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        pl, ll = _table(x_ptr, rows, row_mask, cb, C, scale, ls, DH, DL, D, BLOCK_R, BLOCK_L)
        pl = tl.where(ls[None, :] < (1 << DL), pl, 0.0)
        for h0 in range(0, 1 << DH, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            ph, lh = _table(x_ptr, rows, row_mask, cb, C, scale, hs, 0, DH, D, BLOCK_R, BLOCK_H)
            ph = tl.where(hs[None, :] < (1 << DH), ph, 0.0)
            # max(log_eps, t): NaN kept (tl.maximum propagates it)
            t = tl.maximum(lh[:, :, None] + ll[:, None, :], log_eps)
            inner = tl.sum(pl[:, None, :] * t, axis=2)
            acc += tl.sum(ph * inner, axis=1)
    tl.store(out_ptr + rows * C + cb, -acc, mask=row_mask)


@triton.jit
def _bit_sums(t1, t0, z, idx, valid, cols, START: tl.constexpr, BITS: tl.constexpr):
    """Add to t1 (t0) column START + j the row sums of z over the entries idx whose bit j is 1 (0)."""
    for j in tl.static_range(BITS):
        bit = ((idx >> (BITS - 1 - j)) & 1)[None, :]
        s1 = tl.sum(tl.where(valid[None, :] & (bit != 0), z, 0.0), axis=1)
        s0 = tl.sum(tl.where(valid[None, :] & (bit == 0), z, 0.0), axis=1)
        here = cols[None, :] == START + j
        t1 += tl.where(here, s1[:, None], 0.0)
        t0 += tl.where(here, s0[:, None], 0.0)
    return t1, t0


@triton.jit
def _half_pass(x_ptr, g_ptr, ge, rows, row_mask, cb, C, scale, log_eps, t1, t0, cols,
               X_START: tl.constexpr, X_BITS: tl.constexpr, Y_START: tl.constexpr, Y_BITS: tl.constexpr,
               G_STRIDE_X: tl.constexpr, G_STRIDE_Y: tl.constexpr, D: tl.constexpr,
               HAS_G: tl.constexpr, HAS_E: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """The bit sums of the half X: R_X[x] = sum_y P_Y[y] W(x, y), W = G(x, y) - ge * w(x, y),
    then t1/t0 += bit sums of P_X R_X. G(x, y) sits at g_ptr + x * G_STRIDE_X + y * G_STRIDE_Y."""
    for x0 in range(0, 1 << X_BITS, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        x_valid = xs < (1 << X_BITS)
        px, lx = _table(x_ptr, rows, row_mask, cb, C, scale, xs, X_START, X_BITS, D, BLOCK_R, BLOCK_X)
        r = tl.zeros((BLOCK_R, BLOCK_X), dtype=tl.float32)
        for y0 in range(0, 1 << Y_BITS, BLOCK_Y):
            ys = y0 + tl.arange(0, BLOCK_Y)
            y_valid = ys < (1 << Y_BITS)
            py, ly = _table(x_ptr, rows, row_mask, cb, C, scale, ys, Y_START, Y_BITS, D, BLOCK_R, BLOCK_Y)
            py = tl.where(y_valid[None, :], py, 0.0)
            if HAS_G:
                gt = tl.load(g_ptr + cb * (1 << D) + ys[:, None] * G_STRIDE_Y + xs[None, :] * G_STRIDE_X,
                             mask=y_valid[:, None] & x_valid[None, :], other=0.0)
                r += tl.dot(py, gt, input_precision="ieee")
            if HAS_E:
                t = lx[:, :, None] + ly[:, None, :]
                w = tl.maximum(t, log_eps) + tl.where(t >= log_eps, 1.0, 0.0)
                r -= ge[:, None] * tl.sum(py[:, None, :] * w, axis=2)
        t1, t0 = _bit_sums(t1, t0, px * r, xs, x_valid, cols, X_START, X_BITS)
    return t1, t0


@triton.jit
def _backward_kernel(x_ptr, ge_ptr, g_ptr, out_ptr, N, C, scale, log_eps, D: tl.constexpr, DH: tl.constexpr,
                     DL: tl.constexpr, DPAD: tl.constexpr, HAS_G: tl.constexpr, HAS_E: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < N
    cols = tl.arange(0, DPAD)
    ge = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if HAS_E:
        ge = tl.load(ge_ptr + rows * C + cb, mask=row_mask, other=0.0)
    t1 = tl.zeros((BLOCK_R, DPAD), dtype=tl.float32)
    t0 = tl.zeros((BLOCK_R, DPAD), dtype=tl.float32)
    # High bits: G(h, l) at h * 2^DL + l. Low bits: the same tensor read as G(l, h).
    t1, t0 = _half_pass(x_ptr, g_ptr, ge, rows, row_mask, cb, C, scale, log_eps, t1, t0, cols,
                        0, DH, DH, DL, 1 << DL, 1, D, HAS_G, HAS_E, BLOCK_R, BLOCK_H, BLOCK_L)
    t1, t0 = _half_pass(x_ptr, g_ptr, ge, rows, row_mask, cb, C, scale, log_eps, t1, t0, cols,
                        DH, DL, 0, DH, 1, 1 << DL, D, HAS_G, HAS_E, BLOCK_R, BLOCK_L, BLOCK_H)
    mask = row_mask[:, None] & (cols[None, :] < D)
    a = tl.load(x_ptr + (rows[:, None] * C + cb) * D + cols[None, :], mask=mask, other=0.0) * scale
    p0, p1, _, _ = _bit_factors(a)
    grad = scale * (p0 * t1 - p1 * t0)
    tl.store(out_ptr + (rows[:, None] * C + cb) * D + cols[None, :], grad, mask=mask)


def _blocks(d: int) -> tuple[int, int, int, int, int]:
    """(high bits, low bits, rows, h block, l block). Blocks of at least 16 (tl.dot's
    smallest on the GPU); past the table's size the entries are masked."""
    dh, dl = d // 2, d - d // 2
    return dh, dl, 16, max(16, min(32, 1 << dh)), max(16, min(64, 1 << dl))


def launch_lfq_entropy(x: torch.Tensor, scale: float, eps: float, entropy: torch.Tensor,
                       prob_sum: torch.Tensor) -> None:
    """x (N, C, d) fp32 contiguous; writes entropy (N, C) and prob_sum (C, 2^d) (fp32)."""
    n, c, d = x.shape
    dh, dl, br, bh, bl = _blocks(d)
    with on_device(x):
        _sums_kernel[(triton.cdiv(1 << dh, bh), triton.cdiv(1 << dl, bl), c)](
            x, prob_sum, n, c, float(scale), D=d, DH=dh, DL=dl, BLOCK_R=br, BLOCK_H=bh, BLOCK_L=bl)
        _entropy_kernel[(triton.cdiv(n, br), c)](
            x, entropy, n, c, float(scale), math.log(eps), D=d, DH=dh, DL=dl, BLOCK_R=br,
            BLOCK_H=bh, BLOCK_L=bl)


def launch_lfq_entropy_backward(x: torch.Tensor, scale: float, eps: float, grad_entropy: torch.Tensor | None,
                                grad_prob_sum: torch.Tensor | None, grad_x: torch.Tensor) -> None:
    """Writes grad_x (N, C, d) fp32 from grad_entropy (N, C) and grad_prob_sum (C, 2^d) (None: zero)."""
    n, c, d = x.shape
    dh, dl, br, bh, bl = _blocks(d)
    with on_device(x):
        _backward_kernel[(triton.cdiv(n, br), c)](
            x, x if grad_entropy is None else grad_entropy, x if grad_prob_sum is None else grad_prob_sum,
            grad_x, n, c, float(scale), math.log(eps), D=d, DH=dh, DL=dl,
            DPAD=triton.next_power_of_2(d), HAS_G=grad_prob_sum is not None, HAS_E=grad_entropy is not None,
            BLOCK_R=br, BLOCK_H=bh, BLOCK_L=bl)
