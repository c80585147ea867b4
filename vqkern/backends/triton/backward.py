"""Straight-through backward in one pass: ``grad_z`` and the per-code residual sums.

Each program reads a (rows x columns) block of z, its rows' chosen code rows and
(when grad_z is wanted) grad_quantized, forms the difference ``e - z`` once in
fp32, writes ``grad_z = grad_quantized - scale * (e - z)`` in z's dtype and adds
the difference into ``diff_sums[idx]``: the rows of one code in the block are
summed first, then added with one fp32 atomic per code and column
(``segment_sum.add_per_code``). Summing the residuals, never ``count * e - sum z``,
keeps the codebook gradient exact when z sits near its code or far from the origin.
``scale`` is read from a device pointer: the backward never waits on the host.

The deterministic mode writes grad_z with this kernel (no atomics) and takes the
residual sums from the fixed-order segment sum (``segment_sum.py``, ``base=``).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ._cast import cast_to
from ._device import on_device
from .segment_sum import GPU_SUM_BLOCK_D, GPU_SUM_BLOCK_M, GPU_SUM_WARPS, add_per_code, launch_segment_sum


@triton.jit
def _backward_kernel(gq_ptr, z_ptr, cb_ptr, idx_ptr, scale_ptr, out_ptr, sums_ptr, N, D,
                     stride_gq, stride_gq_d, stride_z, stride_z_d, stride_k, stride_k_d, stride_out, stride_out_d,
                     WRITE_GRAD_Z: tl.constexpr, WRITE_SUMS: tl.constexpr, INTERPRET: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :] * stride_z_d, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(cb_ptr + idx[:, None] * stride_k + cols[None, :] * stride_k_d, mask=mask, other=0.0).to(tl.float32)
    diff = e - z
    if WRITE_GRAD_Z:
        scale = tl.load(scale_ptr)
        gq = tl.load(gq_ptr + rows[:, None] * stride_gq + cols[None, :] * stride_gq_d, mask=mask,
                     other=0.0).to(tl.float32)
        out = gq - scale * diff
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :] * stride_out_d,
                 cast_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if WRITE_SUMS:
        add_per_code(sums_ptr, D, sums_ptr, idx, diff, row_mask, cols, cols < D, False, BLOCK_M)


# GPU: 64 x 64 elements of each input per program keeps loads in flight for
# bandwidth; one config, the kernel is memory bound. At 8 warps ptxas reported 103
# registers for sm_90 for the grad_z-only kernel (224 at 4 warps: 16 vs 32 elements,
# each with a 64-bit pointer). With the residual sums, the blocks of the atomic segment
# sum (segment_sum.GPU_SUM_*: its rows x rows product spills at 64 x 64).
GPU_BLOCK_M, GPU_BLOCK_D, GPU_WARPS = 64, 64, 8
# Interpreter: fewer, larger programs (its cost is per op, not per element).
INTERPRET_BLOCK_M = 128


def launch_backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums) -> None:
    """grad_quantized, z, grad_z (N, D) (any strides), codebook (K, D), indices (N,) int64,
    scale (1,) fp32 on the device; grad_z and/or diff_sums (K, D) fp32 contiguous (None
    skips it). Writes grad_z = grad_quantized - scale * (e - z), adds e - z into diff_sums."""
    n, d = z.shape
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    write_grad_z, write_sums = grad_z is not None, diff_sums is not None
    block_m, max_d, warps = ((INTERPRET_BLOCK_M, 128, GPU_WARPS) if interpreting
                             else (GPU_SUM_BLOCK_M, GPU_SUM_BLOCK_D, GPU_SUM_WARPS) if write_sums
                             else (GPU_BLOCK_M, GPU_BLOCK_D, GPU_WARPS))
    block_d = min(max(16, triton.next_power_of_2(d)), max_d)
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
    # Unused pointers get a real tensor of the right kind; the kernel never touches them.
    gq = grad_quantized if write_grad_z else z
    out = grad_z if write_grad_z else z
    sums = diff_sums if write_sums else scale
    with on_device(z):
        _backward_kernel[grid](gq, z, codebook, indices, scale, out, sums, n, d,
                               *gq.stride(), *z.stride(), *codebook.stride(), *out.stride(),
                               WRITE_GRAD_Z=write_grad_z, WRITE_SUMS=write_sums, INTERPRET=interpreting,
                               BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)


def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic) -> None:
    """Launcher of the backend interface (see ``vqkern.backends``)."""
    if not deterministic:
        launch_backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums)
        return
    if grad_z is not None:
        launch_backward(grad_quantized, z, codebook, indices, scale, grad_z, None)
    if diff_sums is not None:
        launch_segment_sum(indices, z, None, diff_sums, True, base=codebook)
