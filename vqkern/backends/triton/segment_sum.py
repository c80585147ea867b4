"""Per-code counts and row sums: the codebook gradient, EMA statistics and usage histogram.

Atomic path: each program first sums the rows of its block that share a code
(``add_per_code``), then adds one partial sum per code and column into ``sums`` with
fp32 atomics (fast, order-dependent in the last bits). Adding every row with its own
atomic made each code's sum a running fp32 sum over its rows, whose error grows like
the rows when they round alike (residuals of half-precision rows against one fp32
code: 166 fp32 ulps of sum|e - z| at 10^5 rows, PyTorch autograd 1.5); with one
atomic per block and code it grows like the blocks, from partial sums whose low bits
no longer agree.

Deterministic path, two passes over rows sorted stably by code (torch.sort):
each code's run of sorted rows is cut into pieces of at most PIECE rows. Pass 1
gives every piece its own program, which sums the piece's rows in order; a code
of one piece is written by that program alone, a longer code parks its pieces'
sums in a workspace. Pass 2 visits only the codes of several pieces (at most
N / PIECE of them) and adds their pieces in piece order. The order of every
addition is fixed by the inputs alone: bitwise reproducible, no atomics, and no
program walks more than PIECE rows in pass 1 or N / PIECE pieces in pass 2, also
when every row picks one code (a collapsed codebook).

The deterministic path adds in fp64 (each difference or value is exact in fp64, and the
sum is rounded to fp32 once): a reduction's order differs between a GPU (a tree) and the
interpreter (numpy adds a block's rows one after another), and an fp32 running sum of
128 rows already drifted past twice plain PyTorch's error on the codebook gradient of
one code (2.0 fp32 ulps of sum|e - z| at 10^4 fp16 rows against autograd's 0.98). The
kernels are memory bound: fp64 adds cost nothing measurable beside the loads on a
data-centre GPU (H100/H200: 1/2 of the fp32 rate) and stay below the loads' time on
consumer GPUs (1/64) for D up to a few hundred.

``base`` (the residual mode behind the codebook gradient): the sums are of
``base[k] - values_i`` instead, each difference formed in fp32 before it is added.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import on_device


@triton.jit
def add_per_code(sums_ptr, stride_s, counts_ptr, codes, vals, row_mask, cols, col_mask, count,
                 BLOCK_M: tl.constexpr):
    """sums[codes_i, cols] += vals_i for a block of rows (BLOCK_M, BLOCK_D) fp32, and with
    ``count`` counts[codes_i] += 1 (once per row: call it from one column block only).

    The rows of one code in the block are summed first, by a product with the block's
    (rows x rows) same-code matrix (0/1, exact; fp32 "ieee" dot), and the first row of each
    code adds the total with one atomic per column. The product costs BLOCK_M FMAs per
    element, against a memory-bound pass. Non-finite elements stay out of the product
    (0 * inf would spread a NaN to every code of the block) and are added by atomics of
    their own, so a code's sum is still non-finite wherever one of its rows is.
    """
    r = tl.arange(0, BLOCK_M)
    same = (codes[:, None] == codes[None, :]) & row_mask[:, None] & row_mask[None, :]
    earlier = tl.max(tl.where(same & (r[None, :] < r[:, None]), 1, 0), axis=1)
    first = row_mask & (earlier == 0)
    mask = row_mask[:, None] & col_mask[None, :]
    finite = tl.abs(vals) < float("inf")
    total = tl.dot(same.to(tl.float32), tl.where(finite & mask, vals, 0.0), input_precision="ieee")
    dst = sums_ptr + codes[:, None] * stride_s + cols[None, :]
    tl.atomic_add(dst, total, mask=first[:, None] & col_mask[None, :])
    tl.atomic_add(dst, vals, mask=mask & ~finite)
    if count:
        tl.atomic_add(counts_ptr + codes, tl.sum(same.to(tl.float32), axis=1), mask=first)


@triton.jit
def _segment_sum_atomic_kernel(idx_ptr, val_ptr, counts_ptr, sums_ptr, N, D,
                               stride_v, stride_v_d, stride_s,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < D
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    vals = tl.load(val_ptr + rows[:, None] * stride_v + cols[None, :] * stride_v_d,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    add_per_code(sums_ptr, stride_s, counts_ptr, idx, vals, row_mask, cols, col_mask, pid_d == 0, BLOCK_M)


@triton.jit
def _segment_pieces_kernel(order_ptr, bounds_ptr, piece_code_ptr, piece_start_ptr, pieces_ptr,
                           multi_start_ptr, val_ptr, base_ptr, sums_ptr, partial_ptr, K, D, num_pieces,
                           stride_v, stride_v_d, stride_b, stride_s,
                           HAS_BASE: tl.constexpr, PIECE: tl.constexpr, PIECES_PER_PROGRAM: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    col_mask = cols < D
    for q in range(PIECES_PER_PROGRAM):
        piece = pid * PIECES_PER_PROGRAM + q
        code = tl.load(piece_code_ptr + piece, mask=piece < num_pieces, other=K)
        # The grid is an upper bound on the number of pieces: the slots past it hold K.
        if code < K:
            j = piece - tl.load(piece_start_ptr + code)
            start = tl.load(bounds_ptr + code) + j * PIECE
            stop = tl.minimum(tl.load(bounds_ptr + code + 1), start + PIECE)
            if HAS_BASE:
                e = tl.load(base_ptr + code * stride_b + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float64)
            for r0 in range(start, stop, BLOCK_R):
                pos = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
                pos_mask = pos < stop
                rows = tl.load(order_ptr + pos, mask=pos_mask, other=0)
                mask = pos_mask[:, None] & col_mask[None, :]
                vals = tl.load(val_ptr + rows[:, None] * stride_v + cols[None, :] * stride_v_d,
                               mask=mask, other=0.0).to(tl.float32)
                if HAS_BASE:
                    vals = tl.where(mask, e[None, :] - vals, 0.0)
                acc += vals.to(tl.float64)
            total = tl.sum(acc, axis=0)
            if tl.load(pieces_ptr + code) == 1:
                # The code's only piece: this program is its only writer (the caller
                # zero-fills or holds earlier sums, so read-add-write).
                dst = sums_ptr + code * stride_s + cols
                tl.store(dst, (tl.load(dst, mask=col_mask, other=0.0).to(tl.float64) + total).to(tl.float32),
                         mask=col_mask)
            else:
                tl.store(partial_ptr + (tl.load(multi_start_ptr + code) + j) * D + cols, total, mask=col_mask)


@triton.jit
def _segment_combine_kernel(multi_ptr, multi_start_ptr, pieces_ptr, sums_ptr, partial_ptr, K, D, stride_s,
                            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    code = tl.load(multi_ptr + slot)
    count = tl.load(pieces_ptr + code, mask=code < K, other=0)
    # Codes of one piece were written by pass 1; the slots past the multi-piece codes hold them.
    if count > 1:
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        col_mask = cols < D
        first = tl.load(multi_start_ptr + code)
        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float64)
        for p0 in range(0, count, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            mask = (p < count)[:, None] & col_mask[None, :]
            acc += tl.load(partial_ptr + (first + p)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        dst = sums_ptr + code * stride_s + cols
        total = tl.load(dst, mask=col_mask, other=0.0).to(tl.float64) + tl.sum(acc, axis=0)
        tl.store(dst, total.to(tl.float32), mask=col_mask)


# GPU atomic path (add_per_code, also the backward's sums): 32 rows x 32 columns per
# program at 4 warps, one config (memory bound). The rows x rows product of add_per_code
# made 64 x 64 tiles spill on sm_90 (255 registers and 184-376 bytes of stack at 8
# warps; 64 x 32: 222 registers at 8 warps); 32 x 32 at 4 warps took 90 without spills.
GPU_SUM_BLOCK_M, GPU_SUM_BLOCK_D, GPU_SUM_WARPS = 32, 32, 4
# Deterministic path: columns per program.
GPU_BLOCK_D = 64
# Deterministic path: pieces of 256 sorted rows, read 32 at a time, two per program;
# pass 2 adds a multi-piece code's pieces 32 at a time.
GPU_PIECE, GPU_PIECES_PER_PROGRAM, GPU_BLOCK_R, GPU_BLOCK_P = 256, 2, 32, 32
# Interpreter: its cost is per program and per block op (tens of ms a program),
# so fewer programs of larger pieces.
INTERPRET_PIECE, INTERPRET_PIECES_PER_PROGRAM, INTERPRET_BLOCK_R, INTERPRET_BLOCK_P = 512, 32, 128, 64


def _deterministic_segment_sum(indices, values, counts, sums, base) -> None:
    n, d = values.shape
    k = sums.shape[0]
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    piece, per_program, block_r, block_p = (
        (INTERPRET_PIECE, INTERPRET_PIECES_PER_PROGRAM, INTERPRET_BLOCK_R, INTERPRET_BLOCK_P) if interpreting
        else (GPU_PIECE, GPU_PIECES_PER_PROGRAM, GPU_BLOCK_R, GPU_BLOCK_P))
    block_d = min(max(16, triton.next_power_of_2(d)), 128 if interpreting else GPU_BLOCK_D)
    # Piece bookkeeping with sort-based torch ops, all deterministic and on the device;
    # the grids use host-known upper bounds so nothing waits on the device.
    sorted_idx, order = torch.sort(indices, stable=True)
    bounds = torch.searchsorted(sorted_idx, torch.arange(k + 1, device=indices.device, dtype=indices.dtype))
    lengths = bounds[1:] - bounds[:-1]
    if counts is not None:
        counts.add_(lengths.float())
    pieces = (lengths + piece - 1) // piece
    piece_end = torch.cumsum(pieces, 0)
    piece_start = piece_end - pieces
    max_pieces = triton.cdiv(n, piece) + min(k, n)
    # The code of each piece (K, past the last piece).
    piece_code = torch.searchsorted(piece_end, torch.arange(max_pieces, device=indices.device), right=True)
    # Codes of several pieces have more than `piece` rows: at most n // (piece + 1) + 1 of them.
    max_multi = min(k, n // (piece + 1) + 1)
    multi = torch.sort((pieces <= 1).to(torch.int8), stable=True).indices[:max_multi]
    # Only the pieces of multi-piece codes are parked: at most n // piece + max_multi rows
    # (a code of l > piece rows has ceil(l / piece) <= l / piece + 1 pieces), not one row per piece.
    multi_pieces = torch.where(pieces > 1, pieces, 0)
    multi_start = torch.cumsum(multi_pieces, 0) - multi_pieces
    partial = torch.empty((n // piece + max_multi, d), dtype=torch.float64, device=values.device)
    has_base = base is not None
    base_arg = base if has_base else values
    with on_device(values):
        _segment_pieces_kernel[(triton.cdiv(max_pieces, per_program), triton.cdiv(d, block_d))](
            order, bounds, piece_code, piece_start, pieces, multi_start, values, base_arg, sums, partial, k, d,
            max_pieces, values.stride(0), values.stride(1), base_arg.stride(0), sums.stride(0),
            HAS_BASE=has_base, PIECE=piece, PIECES_PER_PROGRAM=per_program, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=4)
        _segment_combine_kernel[(max_multi, triton.cdiv(d, block_d))](
            multi, multi_start, pieces, sums, partial, k, d, sums.stride(0),
            BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4)


def launch_segment_sum(indices, values, counts, sums, deterministic, *, base=None) -> None:
    """indices (N,) int64 in [0, K), values (N, D) float (any strides), counts (K,) fp32
    (or None: not counted) and sums (K, D) fp32 contiguous, zero-filled or holding sums
    to add to. Adds per-code row counts and row sums (of ``base[k] - values_i`` with
    ``base`` (K, D) given, deterministic path only). ``deterministic`` -> bitwise reproducible."""
    n, d = values.shape
    if n == 0:
        return
    if deterministic:
        _deterministic_segment_sum(indices, values, counts, sums, base)
        return
    if base is not None or counts is None:
        raise ValueError("the atomic segment sum takes counts and no base")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block_d = min(max(16, triton.next_power_of_2(d)), 128 if interpreting else GPU_BLOCK_D)
    if not interpreting:
        block_d = min(block_d, GPU_SUM_BLOCK_D)
    block_m = 128 if interpreting else GPU_SUM_BLOCK_M
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
    with on_device(values):
        _segment_sum_atomic_kernel[grid](indices, values, counts, sums, n, d,
                                         values.stride(0), values.stride(1), sums.stride(0),
                                         BLOCK_M=block_m, BLOCK_D=block_d, num_warps=GPU_SUM_WARPS)


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    """Launcher of the backend interface (see ``vqkern.backends``)."""
    launch_segment_sum(indices, values, counts, sums, deterministic)
