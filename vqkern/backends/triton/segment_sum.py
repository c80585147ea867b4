"""Per-code counts and row sums: the codebook gradient, EMA statistics and usage histogram.

Atomic path: each program adds its block of rows into ``counts`` and ``sums``
with fp32 atomics (fast, order-dependent in the last bits).

Deterministic path: the indices are sorted stably with torch, segment bounds
come from ``searchsorted``, and each program owns a block of codes and reduces
each code's rows in sorted order, BLOCK_R rows at a time into an fp32 tile that
is summed once at the end: a fixed order, no atomics, bitwise reproducible.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_atomic_kernel(idx_ptr, val_ptr, counts_ptr, sums_ptr, N, D,
                               stride_v, stride_v_d, stride_s,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    vals = tl.load(val_ptr + rows[:, None] * stride_v + cols[None, :] * stride_v_d, mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + idx[:, None] * stride_s + cols[None, :], vals.to(tl.float32), mask=mask)
    if pid_d == 0:
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        tl.atomic_add(counts_ptr + idx, ones, mask=row_mask)


@triton.jit
def _segment_sum_sorted_kernel(order_ptr, bounds_ptr, val_ptr, counts_ptr, sums_ptr, K, D,
                               stride_v, stride_v_d, stride_s,
                               CODES_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    pid_k = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    col_mask = cols < D
    for j in range(CODES_PER_PROGRAM):
        code = pid_k * CODES_PER_PROGRAM + j
        if code < K:
            start = tl.load(bounds_ptr + code)
            stop = tl.load(bounds_ptr + code + 1)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for r0 in range(start, stop, BLOCK_R):
                pos = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
                pos_mask = pos < stop
                rows = tl.load(order_ptr + pos, mask=pos_mask, other=0)
                vals = tl.load(val_ptr + rows[:, None] * stride_v + cols[None, :] * stride_v_d,
                               mask=pos_mask[:, None] & col_mask[None, :], other=0.0)
                acc += vals.to(tl.float32)
            # The caller zero-fills; this program alone owns code, so read-add-write is safe.
            dst = sums_ptr + code * stride_s + cols
            tl.store(dst, tl.load(dst, mask=col_mask, other=0.0) + tl.sum(acc, axis=0), mask=col_mask)
            if pid_d == 0:
                tl.store(counts_ptr + code, tl.load(counts_ptr + code) + (stop - start).to(tl.float32))


# GPU atomic path: 64 rows x 64 columns per program at 8 warps (118 registers on
# sm_90; 168 at 4 warps), one config (memory bound).
GPU_BLOCK_M, GPU_BLOCK_D, GPU_ATOMIC_WARPS = 64, 64, 8
# Deterministic path: codes per program amortize launch cost at large K; BLOCK_R
# rows of a segment are read per step.
GPU_CODES_PER_PROGRAM, GPU_BLOCK_R = 4, 32
INTERPRET_CODES_PER_PROGRAM, INTERPRET_BLOCK_R = 16, 64


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    """Launcher: indices (N,) int64 in [0, K), values (N, D) float (any strides),
    counts (K,) fp32 and sums (K, D) fp32 contiguous and zero-filled by the caller;
    adds per-code row counts and row sums. ``deterministic`` -> bitwise reproducible."""
    n, d = values.shape
    k = counts.shape[0]
    if n == 0:
        return
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block_d = min(max(16, triton.next_power_of_2(d)), 128 if interpreting else GPU_BLOCK_D)
    strides = (values.stride(0), values.stride(1), sums.stride(0))
    if not deterministic:
        block_m = 128 if interpreting else GPU_BLOCK_M
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
        _segment_sum_atomic_kernel[grid](indices, values, counts, sums, n, d, *strides,
                                         BLOCK_M=block_m, BLOCK_D=block_d, num_warps=GPU_ATOMIC_WARPS)
        return
    sorted_idx, order = torch.sort(indices, stable=True)
    bounds = torch.searchsorted(sorted_idx, torch.arange(k + 1, device=indices.device, dtype=indices.dtype))
    per_program = INTERPRET_CODES_PER_PROGRAM if interpreting else GPU_CODES_PER_PROGRAM
    block_r = INTERPRET_BLOCK_R if interpreting else GPU_BLOCK_R
    grid = (triton.cdiv(k, per_program), triton.cdiv(d, block_d))
    _segment_sum_sorted_kernel[grid](order, bounds, values, counts, sums, k, d, *strides,
                                     CODES_PER_PROGRAM=per_program, BLOCK_R=block_r,
                                     BLOCK_D=block_d, num_warps=4)
