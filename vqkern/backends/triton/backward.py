"""Straight-through backward for z: ``grad_quantized + scale * (z - codebook[idx])``.

One fused pass: each element of grad_quantized and z is read once, the chosen
code rows are gathered by index, the sum is formed in fp32 and written once in
out's dtype. The codebook gradient comes from ``segment_sum``.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ._cast import cast_to


@triton.jit
def _grad_z_kernel(gq_ptr, z_ptr, cb_ptr, idx_ptr, out_ptr, scale, N, D,
                   stride_gq, stride_gq_d, stride_z, stride_z_d, stride_k, stride_k_d, stride_out, stride_out_d,
                   INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    gq = tl.load(gq_ptr + rows[:, None] * stride_gq + cols[None, :] * stride_gq_d, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :] * stride_z_d, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(cb_ptr + idx[:, None] * stride_k + cols[None, :] * stride_k_d, mask=mask, other=0.0).to(tl.float32)
    out = gq + scale * (z - e)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :] * stride_out_d, cast_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# GPU: 64 x 64 elements of each input per program keeps loads in flight for
# bandwidth; one config, the kernel is memory bound. At 8 warps ptxas reports 103
# registers for sm_90 (224 at 4 warps: 16 vs 32 elements, each with a 64-bit pointer).
GPU_BLOCK_M, GPU_BLOCK_D, GPU_WARPS = 64, 64, 8
# Interpreter: fewer, larger programs (its cost is per op, not per element).
INTERPRET_BLOCK_M = 128


def grad_z(grad_quantized, z, codebook, indices, scale, out) -> None:
    """Launcher: grad_quantized, z, out (N, D) (any strides; a unit column stride is
    specialized by the compiler), codebook (K, D), indices (N,) int64, scale a
    Python float. Writes out = grad_quantized + scale * (z - codebook[indices])."""
    n, d = z.shape
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block_m = INTERPRET_BLOCK_M if interpreting else GPU_BLOCK_M
    block_d = min(max(16, triton.next_power_of_2(d)), 128 if interpreting else GPU_BLOCK_D)
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
    _grad_z_kernel[grid](grad_quantized, z, codebook, indices, out, float(scale), n, d,
                         *grad_quantized.stride(), *z.stride(), *codebook.stride(), *out.stride(),
                         INTERPRET=interpreting, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=GPU_WARPS)
