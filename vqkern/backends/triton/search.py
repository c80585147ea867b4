"""Fused nearest-code search: distance, argmin and gather without an N x K matrix.

Each program owns BLOCK_M rows of z and streams the codebook in BLOCK_N-code
tiles. A tile's scores ``|e|^2 - 2 z.e`` come from ``tl.dot`` with fp32
accumulation (|z|^2 is constant per row and cannot change the argmin); each row
keeps a running (min, argmin), replaced only on a strictly smaller score so the
lowest index wins ties, across tiles as inside one. The epilogue gathers the
chosen code, writes it in z's dtype and recomputes the distance exactly from the
residual ``sum((z - e)^2)`` in fp32.

When there are too few row blocks to fill the GPU (small N, huge K), the codes
are split across ``num_splits`` programs per row block (a run-time argument, so a
new split count never recompiles); each writes a partial
(min score, argmin) per row and a second small kernel reduces the partials (the
lowest split wins ties, and splits cover increasing code ranges, so the lowest
index still wins) and runs the same epilogue.

Precision: fp16/bf16 operands of one dtype go to ``tl.dot`` as they are (their
products are exact in fp32, accumulated in fp32); mixed dtypes are upcast to
fp32. fp32 dots use ``input_precision="ieee"`` by default, so the fp32 search
ranks codes as exactly as an fp32 reference. ``VQKERN_TRITON_FP32_PRECISION=tf32``
or ``tf32x3`` search fp32 on tensor cores instead, keeping each row's two best
scores; the rows whose gap lies within the worst-case error of that precision
are searched again with ieee dots (only the row blocks holding one), so the codes
stay those of the ieee search (``VQKERN_TRITON_RECHECK=0`` skips the re-check, to
measure it). tf32x3 (three tf32 products) is about 2^-21 relative, so its re-check
touches few rows; tf32's 2^-10 flags rows whose two best codes are close.

Frame: fp32 dots rank ``|e - c|^2 - 2 (z - c).(e - c)``, z and the codes moved by
the rows' centre c (``vqkern.backends._frame``) as their tiles are loaded, so the
rounding scales with the distance of the rows and their nearest codes from c, not from
the origin (50 standard deviations out, the plain fp32 expansion picked a
farther code on 48 of 4000 rows). fp16/bf16 operands of one dtype stay in the origin's
frame, their bound relative to |z|^2 + |e|^2: moved and rounded back to 16 bits they
would lose 2^-9 (bf16) or 2^-12 (fp16) of the spread. Emulated on CPU
(benchmarks/half_frame.py), bf16 lost nothing in the origin's frame out to 500 standard
deviations and fp16 chose a farther code on 1% of rows at 50; an exact centring (hi/lo
split, three products) lost nothing, at three times the tensor-core work, not yet timed
on a GPU (docs/precision.md).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._frame import frame_centre
from ._cast import cast_to
from ._device import on_device


@triton.jit
def _code_norms_kernel(cb_ptr, centre_ptr, norms_ptr, K, D, stride_k,
                       CENTRE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # |e - c|^2 (CENTRE) or |e|^2 once per call, in fp32: the search kernels read it per tile.
    pid = tl.program_id(0).to(tl.int64)
    codes = pid * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    code_mask = codes < K
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = code_mask[:, None] & (cols[None, :] < D)
        e = tl.load(cb_ptr + codes[:, None] * stride_k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if CENTRE:
            e = tl.where(mask, e - tl.load(centre_ptr + cols, mask=cols < D, other=0.0)[None, :], 0.0)
        acc += tl.sum(e * e, axis=1)
    tl.store(norms_ptr + codes, acc, mask=code_mask)


@triton.jit
def _epilogue(z_ptr, cb_ptr, idx_out_ptr, dist_ptr, q_ptr, rows, row_mask, best_idx, D,
              stride_zm, stride_k, stride_qm, INTERPRET: tl.constexpr, BLOCK_D: tl.constexpr):
    # Gather the chosen codes, write them in z's dtype, and the residual distance in fp32.
    dist = tl.zeros_like(best_idx).to(tl.float32)
    # Not pipelined: prefetching the gathered rows of later chunks only adds registers.
    for d0 in tl.range(0, D, BLOCK_D, num_stages=1):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :], mask=mask, other=0.0)
        e = tl.load(cb_ptr + best_idx[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
        diff = z.to(tl.float32) - e.to(tl.float32)
        dist += tl.sum(diff * diff, axis=1)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], cast_to(e, q_ptr.dtype.element_ty, INTERPRET),
                 mask=mask)
    tl.store(idx_out_ptr + rows, best_idx, mask=row_mask)
    tl.store(dist_ptr + rows, dist, mask=row_mask)


@triton.jit
def _search_kernel(z_ptr, cb_ptr, norms_ptr, idx_out_ptr, dist_ptr, q_ptr, part_val_ptr, part_idx_ptr,
                   second_ptr, flag_ptr, zn2_ptr, centre_ptr,
                   N, K, D, stride_zm, stride_k, stride_qm, num_splits, inv_temperature, seed,
                   SPLIT: tl.constexpr, INTERPRET: tl.constexpr, ONE_CHUNK: tl.constexpr, DOT_FP32: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, CENTRE: tl.constexpr,
                   TRACK_SECOND: tl.constexpr, ROW_FILTER: tl.constexpr, SAMPLE: tl.constexpr, COSINE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EPI_BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    # Split boundaries fall on tile boundaries, so a split scores exactly the tiles
    # the unsplit loop would.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_N), num_splits)
    k_start = split * tiles_per_split * BLOCK_N
    k_stop = tl.minimum(K, k_start + tiles_per_split * BLOCK_N)
    if ROW_FILTER:
        # The exact re-check of the tf32 search: only flagged rows are scored and
        # written; a block without one scans nothing (an empty loop, no early return).
        flags = tl.load(flag_ptr + rows, mask=row_mask, other=0)
        row_mask = row_mask & (flags != 0)
        k_stop = tl.where(tl.max(flags.to(tl.int32), axis=0) > 0, k_stop, k_start)
    if SAMPLE:
        zn2 = tl.load(zn2_ptr + rows, mask=row_mask, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    # The runner-up score, for the re-check of near-ties after a tf32 search.
    second = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    # Index 0 is a valid code: a row whose scores are all NaN or +inf keeps it.
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if ONE_CHUNK:
        # D <= BLOCK_D: the z tile is loaded once and stays in registers for every tile.
        cols = tl.arange(0, BLOCK_D)
        z_tile = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :],
                         mask=row_mask[:, None] & (cols[None, :] < D), other=0.0)
        if DOT_FP32:
            z_tile = z_tile.to(tl.float32)
        if CENTRE:
            # The frame centred on the rows (launch_search); padding columns stay 0.
            centre = tl.load(centre_ptr + cols, mask=cols < D, other=0.0)
            z_tile = z_tile - centre[None, :]
    # Under the interpreter tl.dot is a BLAS sgemm whose rounding depends on a
    # column's position in the tile, so identical codes could score differently;
    # there the product is a broadcast summed over D in order, the same for every
    # column, as the compiled dot is. (Written inline: a nested jit call costs the
    # interpreter milliseconds per tile.)
    for k0 in range(k_start, k_stop, BLOCK_N):
        codes = k0 + tl.arange(0, BLOCK_N).to(tl.int64)
        code_mask = codes < k_stop
        if ONE_CHUNK:
            e = tl.load(cb_ptr + codes[None, :] * stride_k + cols[:, None],
                        mask=code_mask[None, :] & (cols[:, None] < D), other=0.0)
            if DOT_FP32:
                e = e.to(tl.float32)
            if CENTRE:
                e = e - centre[:, None]
            if INTERPRET:
                acc = tl.sum(z_tile.to(tl.float32)[:, :, None] * e.to(tl.float32)[None, :, :], axis=1)
            else:
                acc = tl.dot(z_tile, e, input_precision=INPUT_PRECISION)
        else:
            # Large D: BLOCK_D chunks keep the register tiles bounded; the z chunks
            # are re-read per tile (from L1/L2, they were read by the previous tile).
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols_d = d0 + tl.arange(0, BLOCK_D)
                col_mask = cols_d < D
                z = tl.load(z_ptr + rows[:, None] * stride_zm + cols_d[None, :],
                            mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                e = tl.load(cb_ptr + codes[None, :] * stride_k + cols_d[:, None],
                            mask=code_mask[None, :] & col_mask[:, None], other=0.0)
                if DOT_FP32:
                    z = z.to(tl.float32)
                    e = e.to(tl.float32)
                if CENTRE:
                    centre = tl.load(centre_ptr + cols_d, mask=col_mask, other=0.0)
                    z = z - centre[None, :]
                    e = e - centre[:, None]
                if INTERPRET:
                    acc += tl.sum(z.to(tl.float32)[:, :, None] * e.to(tl.float32)[None, :, :], axis=1)
                else:
                    acc = tl.dot(z, e, acc, input_precision=INPUT_PRECISION)
        norms = tl.load(norms_ptr + codes, mask=code_mask, other=float("inf"))
        if SAMPLE:
            # Gumbel-max: the argmin of -(logit / T + G), G = -log(-log U) i.i.d., is a draw
            # from softmax(logit / T); the argmin splits over code tiles like the search's.
            # Logits as vector-quantize-pytorch's: -|z - e| from the expansion clamped at
            # 1e-8 (l2), z.e of unit vectors (cosine). Philox noise counted by row * K + code:
            # the same draw whatever the tiling, split or GPU.
            if COSINE:
                logits = acc
            else:
                logits = -tl.sqrt(tl.maximum(zn2[:, None] + norms[None, :] - 2.0 * acc, 1e-8))
            u = tl.rand(seed, rows[:, None] * K + codes[None, :])
            gumbel = -tl.log(tl.maximum(-tl.log(tl.maximum(u, 1e-20)), 1e-20))
            scores = -(logits * inv_temperature + gumbel)
        else:
            scores = norms[None, :] - 2.0 * acc
        # Non-finite scores (a NaN or infinite code or row: NaN, or inf - inf) become +inf
        # before the reduction: min's combine keeps an operand when a comparison with NaN
        # is false, so one NaN could become the tile's minimum and drop the true nearest
        # code, depending on the reduction order. NaN never wins, as in the CUDA kernel.
        scores = tl.where(code_mask[None, :] & (tl.abs(scores) < float("inf")), scores, float("inf"))
        tile_min, tile_arg = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        if TRACK_SECOND:
            others = tl.where(tl.arange(0, BLOCK_N)[None, :] == tile_arg[:, None], float("inf"), scores)
            # The second smallest of {best, second, tile_min, tile's second}.
            second = tl.minimum(tl.maximum(best, tile_min), tl.minimum(second, tl.min(others, axis=1)))
        # Strictly smaller only: earlier tiles keep ties.
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, k0 + tile_arg.to(tl.int64), best_idx)
    if not SPLIT:
        _epilogue(z_ptr, cb_ptr, idx_out_ptr, dist_ptr, q_ptr, rows, row_mask, best_idx, D,
                  stride_zm, stride_k, stride_qm, INTERPRET, EPI_BLOCK_D)
        if TRACK_SECOND:
            tl.store(part_val_ptr + rows, best, mask=row_mask)
            tl.store(second_ptr + rows, second, mask=row_mask)
    else:
        part = rows * num_splits + split
        tl.store(part_val_ptr + part, best, mask=row_mask)
        tl.store(part_idx_ptr + part, best_idx, mask=row_mask)
        if TRACK_SECOND:
            tl.store(second_ptr + part, second, mask=row_mask)


@triton.jit
def _split_reduce_kernel(z_ptr, cb_ptr, part_val_ptr, part_idx_ptr, idx_out_ptr, dist_ptr, q_ptr,
                         part_second_ptr, best_ptr, second_ptr,
                         N, D, stride_zm, stride_k, stride_qm, num_splits,
                         INTERPRET: tl.constexpr, TRACK_SECOND: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int64)
    second = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    # BLOCK_S splits at a time keeps the tile small (64 x 512 at once would spill).
    # Split s covers lower codes than split s + 1, so the leftmost minimal split holds
    # the lowest minimal index: ties keep the earlier chunk and, inside one, the left.
    # Partials are never NaN (non-finite scores never replace +inf).
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (splits[None, :] < num_splits)
        part = rows[:, None] * num_splits + splits[None, :]
        vals = tl.load(part_val_ptr + part, mask=mask, other=float("inf"))
        idxs = tl.load(part_idx_ptr + part, mask=mask, other=0)
        chunk_min, which = tl.min(vals, axis=1, return_indices=True, return_indices_tie_break_left=True)
        chunk_idx = tl.sum(tl.where(tl.arange(0, BLOCK_S)[None, :] == which[:, None], idxs, 0), axis=1)
        if TRACK_SECOND:
            seconds = tl.load(part_second_ptr + part, mask=mask, other=float("inf"))
            others = tl.where(tl.arange(0, BLOCK_S)[None, :] == which[:, None], float("inf"), vals)
            chunk_second = tl.minimum(tl.min(others, axis=1), tl.min(seconds, axis=1))
            second = tl.minimum(tl.maximum(best, chunk_min), tl.minimum(second, chunk_second))
        better = chunk_min < best
        best = tl.where(better, chunk_min, best)
        best_idx = tl.where(better, chunk_idx, best_idx)
    _epilogue(z_ptr, cb_ptr, idx_out_ptr, dist_ptr, q_ptr, rows, row_mask, best_idx, D,
              stride_zm, stride_k, stride_qm, INTERPRET, BLOCK_D)
    if TRACK_SECOND:
        tl.store(best_ptr + rows, best, mask=row_mask)
        tl.store(second_ptr + rows, second, mask=row_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# GPU tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) that autotuning picks from.
# tl.dot needs M, N, K >= 16; 128 x 128 fp32 accumulators are 64 registers per thread at 8 warps.
SEARCH_CONFIGS = ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 4, 4), (64, 256, 8, 3))
# VQKERN_TRITON_SEARCH_CONFIG=i launches SEARCH_CONFIGS[i] alone, without autotuning: a
# test runs every config (autotuning would run only its winner) and compute-sanitizer
# checks one kernel, not a timing sweep over six.
PIN_ENV = "VQKERN_TRITON_SEARCH_CONFIG"


def _search_configs():
    """The autotuning configs, built on the first GPU launch (nothing at import)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in SEARCH_CONFIGS]


def _pinned_config():
    value = os.environ.get(PIN_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) >= len(SEARCH_CONFIGS):
        raise ValueError(f"{PIN_ENV} must be an index of SEARCH_CONFIGS (0 to {len(SEARCH_CONFIGS) - 1}), "
                         f"got {value!r}")
    return SEARCH_CONFIGS[int(value)]


@functools.cache
def _tuned_search_kernel():
    # The split count is a run-time argument (a new N never recompiles); only whether
    # the kernel writes partials or runs the epilogue is compiled in.
    key = ["K", "D", "SPLIT", "DOT_FP32", "INPUT_PRECISION", "TRACK_SECOND", "ROW_FILTER", "SAMPLE", "COSINE"]
    return triton.autotune(configs=_search_configs(), key=key)(_search_kernel)


# Under the interpreter: one config; its cost is milliseconds per program and per
# block op, almost nothing per element, so the tiles are big.
# Every tl.sum / tl.min there is a nested jit call costing ~8 ms, paid per tile.
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_N = 1024
# Triton caps a block at 2^20 elements; the interpreter's (M, D, N) product is one.
INTERPRET_MAX_PRODUCT = 2**20
INTERPRET_NORM_BLOCK_K = 1024
# The epilogue gathers code rows through 64-bit pointers: 16 columns a step keeps
# a 128-row block at 8 warps under 200 registers (64 columns spilled 480 bytes).
EPI_BLOCK_D = 16
# Nominal row block used to decide on split-K (the tuned BLOCK_M is not known yet).
SPLIT_BLOCK_M = 64
# A split scans at least this many codes, so the partials stay small beside the codebook.
MIN_CODES_PER_SPLIT = 2048
# Splits reduced per step by the second kernel.
REDUCE_BLOCK_S = 32


def _pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _block_d(d: int, dot_fp32: bool, fp32_precision: str, interpreting: bool) -> int:
    if interpreting:
        return min(_pow2_at_least_16(d), 64)
    if not dot_fp32:
        # Tensor cores: a z tile of up to 128 columns stays in registers for the whole
        # scan; wider D streams 32-column chunks (64 spilled 168 B at 128x128, 8 warps).
        return _pow2_at_least_16(d) if d <= 128 else 32
    # fp32 "ieee" dots run on FMA units with both operands in registers: 16 columns
    # a step keeps 64x64 tiles spill-free; tf32 takes 32 (spill-free at 128x128).
    return 16 if fp32_precision == "ieee" else 32


def _choose_splits(z: torch.Tensor, n: int, k: int) -> int:
    forced = os.environ.get("VQKERN_TRITON_NUM_SPLITS")
    if forced:
        return max(1, int(forced))
    if z.device.type != "cuda":
        return 1
    row_blocks = triton.cdiv(n, SPLIT_BLOCK_M)
    target = 2 * _sm_count(z.device.index if z.device.index is not None else torch.cuda.current_device())
    if row_blocks >= target:
        return 1
    return max(1, min(triton.cdiv(target, row_blocks), k // MIN_CODES_PER_SPLIT))


FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
# Worst-case error of the difference of two codes' scores |e|^2 - 2 z.e, in units of
# |z| * max|e|, for each tensor-core precision and D: operands rounded to tf32
# (relative 2^-11 each, so 2^-10 a product) or split in three tf32 products
# (3 * 2^-22), plus fp32 accumulation over D terms (D * 2^-24, which the ieee search
# has too), for each of the two scores and each of their two terms' factor 2.
def _recheck_bound(precision: str, d: int) -> float:
    rounding = {"tf32": 2.0 ** -10, "tf32x3": 3 * 2.0 ** -22}[precision]
    return 2 * 2 * 2 * (rounding + d * 2.0 ** -24)


def _fp32_precision() -> str:
    mode = os.environ.get("VQKERN_TRITON_FP32_PRECISION", "ieee").lower()
    if mode not in FP32_PRECISIONS:
        raise ValueError(f"VQKERN_TRITON_FP32_PRECISION must be one of {FP32_PRECISIONS}, got {mode!r}")
    return mode


def _recheck_enabled() -> bool:
    return os.environ.get("VQKERN_TRITON_RECHECK", "1").strip() != "0"


def launch_search(z, codebook, indices, distances, quantized, *, num_splits=None, block_d=None,
                  block_n=None, fp32_precision=None, recheck=None):
    """Search with explicit knobs, so tests reach every path: ``num_splits`` > 1
    forces the split-K path, ``block_d`` the D chunk and ``block_n`` the code tile
    (powers of two >= 16; a given ``block_n`` bypasses autotuning, BLOCK_M = 64);
    ``fp32_precision`` ("ieee", "tf32", "tf32x3") the tl.dot precision of fp32
    operands and ``recheck`` the exact re-check that follows a tensor-core fp32 search.

    A tensor-core fp32 search ("tf32", "tf32x3") keeps each row's two best scores;
    the rows whose gap is within the worst-case error of that precision
    (``_recheck_bound``) are searched again with "ieee" dots, so the codes are those
    of the fp32 search whatever the precision. The bound's scale (|z| and the
    largest |e|) and the flags are computed on the device: no host sync."""
    n, d = z.shape
    k = codebook.shape[0]
    interpreting = _interpreting()
    # Operands of one 16-bit dtype go to tl.dot as they are; mixed dtypes meet in
    # fp32 (the interpreter's product is fp32 whatever the dtypes).
    dot_fp32 = z.dtype != codebook.dtype or z.dtype == torch.float32
    if fp32_precision is None:
        fp32_precision = "ieee" if interpreting else _fp32_precision()
    if recheck is None:
        recheck = _recheck_enabled()
    track_second = dot_fp32 and fp32_precision != "ieee" and recheck
    splits = _choose_splits(z, n, k) if num_splits is None else max(1, int(num_splits))
    best = second = None
    if track_second:
        best = torch.empty(n, dtype=torch.float32, device=z.device)
        second = torch.empty(n, dtype=torch.float32, device=z.device)
    with on_device(z):
        centre, norms = _frame_and_norms(z, codebook, dot_fp32, interpreting)
        _search_pass(z, codebook, norms, indices, distances, quantized, splits, dot_fp32, fp32_precision,
                     block_d, block_n, interpreting, centre, best=best, second=second)
        if track_second:
            # The bound's scale in the frame the scores were computed in.
            scale = ((z.float() - centre).square().sum(dim=1) * norms.max()).sqrt_()
            flags = ((second - best) <= scale.mul_(_recheck_bound(fp32_precision, d))).to(torch.int8)
            _search_pass(z, codebook, norms, indices, distances, quantized, 1, dot_fp32, "ieee",
                         None, block_n, interpreting, centre, flags=flags)


def _frame_and_norms(z, codebook, centred, interpreting):
    """(centre (D,) fp32, squared code norms (K,) fp32 in that frame): the rows' centre
    (``frame_centre(z)``) when ``centred``, else zeros (the origin's frame)."""
    k, d = codebook.shape
    centre = (frame_centre(z) if centred
              else torch.zeros(d, dtype=torch.float32, device=codebook.device))
    norms = torch.empty(k, dtype=torch.float32, device=codebook.device)
    norm_block_d = min(_pow2_at_least_16(d), 128 if interpreting else 32)
    norm_block_k = INTERPRET_NORM_BLOCK_K if interpreting else 64
    _code_norms_kernel[(triton.cdiv(k, norm_block_k),)](codebook, centre, norms, k, d, codebook.stride(0),
                                                        CENTRE=centred, BLOCK_K=norm_block_k, BLOCK_D=norm_block_d)
    return centre, norms


def _search_pass(z, codebook, norms, indices, distances, quantized, splits, dot_fp32, precision, block_d,
                 block_n, interpreting, centre, *, best=None, second=None, flags=None, sample=None):
    """One search over every code, in the frame centred on ``centre`` (D,) fp32 when
    the dots are fp32 (norms in that frame): best and second (N,) fp32 given -> each row's two
    best scores are written there; flags (N,) int8 given -> only the flagged rows are
    searched and written; sample (zn2 (N,) fp32, 1 / temperature, seed, cosine) given ->
    each row's code is drawn from softmax(logit / temperature) instead (Gumbel-max)."""
    n, d = z.shape
    k = codebook.shape[0]
    if block_d is None:
        block_d = _block_d(d, dot_fp32, precision, interpreting)
    one_chunk = d <= block_d
    track_second = second is not None
    part_second = second
    if splits > 1:
        part_val = torch.empty((n, splits), dtype=torch.float32, device=z.device)
        part_idx = torch.empty((n, splits), dtype=torch.int64, device=z.device)
        if track_second:
            part_second = torch.empty((n, splits), dtype=torch.float32, device=z.device)
    else:
        # Without a split the kernel writes the best score to part_val only when it
        # tracks the runner-up; part_idx is never read.
        part_val, part_idx = (best if track_second else distances), indices
    zn2, inv_temperature, seed, cosine = sample if sample is not None else (distances, 1.0, 0, False)
    args = (z, codebook, norms, indices, distances, quantized, part_val, part_idx,
            part_second if track_second else distances, flags if flags is not None else indices, zn2, centre,
            n, k, d, z.stride(0), codebook.stride(0), quantized.stride(0), splits, inv_temperature, seed)
    epi_block_d = min(_pow2_at_least_16(d), 128) if interpreting else EPI_BLOCK_D
    meta = dict(SPLIT=splits > 1, INTERPRET=interpreting, ONE_CHUNK=one_chunk, DOT_FP32=dot_fp32,
                INPUT_PRECISION=precision, CENTRE=dot_fp32 and not cosine, TRACK_SECOND=track_second,
                ROW_FILTER=flags is not None, SAMPLE=sample is not None, COSINE=cosine,
                BLOCK_D=block_d, EPI_BLOCK_D=epi_block_d)
    pinned = _pinned_config()
    if pinned is not None:
        bm, bn, warps, stages = pinned
        _search_kernel[(triton.cdiv(n, bm), splits)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                      num_stages=stages)
    elif interpreting or block_n is not None:
        block_m = INTERPRET_BLOCK_M if interpreting else 64
        grid = (triton.cdiv(n, block_m), splits)
        if block_n is None:
            block_n = min(INTERPRET_BLOCK_N, INTERPRET_MAX_PRODUCT // (block_m * block_d))
        _search_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    else:
        def grid(m):
            return (triton.cdiv(n, m["BLOCK_M"]), splits)
        _tuned_search_kernel()[grid](*args, **meta)
    if splits > 1:
        reduce_block_m = 64
        _split_reduce_kernel[(triton.cdiv(n, reduce_block_m),)](
            z, codebook, part_val, part_idx, indices, distances, quantized,
            part_second if track_second else part_val, best if track_second else part_val,
            second if track_second else part_val,
            n, d, z.stride(0), codebook.stride(0), quantized.stride(0), splits,
            INTERPRET=interpreting, TRACK_SECOND=track_second, BLOCK_S=REDUCE_BLOCK_S,
            BLOCK_M=reduce_block_m, BLOCK_D=epi_block_d, num_warps=4)


def launch_sample(z, codebook, indices, distances, quantized, inv_temperature, seed, cosine, *,
                  num_splits=None, block_n=None):
    """A code per row drawn from softmax(logit / temperature) by the fused search (Gumbel-max
    over code tiles, Philox noise of (seed, row * K + code)): logit -|z - e| (l2) or z.e
    (cosine: z and codebook unit rows). Writes indices, the drawn code's exact distance and
    row like the search; fp32 operands use ieee dots. Never N x K."""
    n, d = z.shape
    k = codebook.shape[0]
    interpreting = _interpreting()
    dot_fp32 = z.dtype != codebook.dtype or z.dtype == torch.float32
    splits = _choose_splits(z, n, k) if num_splits is None else max(1, int(num_splits))
    with on_device(z):
        # l2 logits -|z - e| from |z - c|^2 + |e - c|^2 - 2 (z - c).(e - c); cosine logits
        # are z.e of unit rows, in the origin's frame.
        centre, norms = _frame_and_norms(z, codebook, dot_fp32 and not cosine, interpreting)
        zn2 = (z.float() - centre).square().sum(dim=1)
        _search_pass(z, codebook, norms, indices, distances, quantized, splits, dot_fp32, "ieee", None, block_n,
                     interpreting, centre, sample=(zn2, float(inv_temperature), int(seed), bool(cosine)))


def sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized) -> None:
    """Launcher of the backend interface (see ``vqkern.backends``)."""
    launch_sample(z, codebook, indices, distances, quantized, inv_temperature, seed, cosine)


def search(z, codebook, indices, distances, quantized) -> None:
    """Launcher of the backend interface: z (N, D), codebook (K, D) contiguous floats;
    writes indices (N,) int64, distances (N,) fp32, quantized (N, D) in z's dtype."""
    launch_search(z, codebook, indices, distances, quantized)
