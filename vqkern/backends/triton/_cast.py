"""Casting helper shared by the kernels that write in z's dtype."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, also under the interpreter.

    The triton 3.6 interpreter truncates fp32 -> bf16 (and converts other pairs
    involving bf16 through its raw bits), so there the rounding is done by hand on
    the fp32 bits; compiled code uses the hardware's RNE conversion.
    """
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            # A NaN's payload could carry into the sign bit: use the quiet NaN.
            bits = tl.where(x != x, 0x7FC00000, bits)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(tl.float32).to(dtype)
    else:
        y = x.to(dtype)
    return y
