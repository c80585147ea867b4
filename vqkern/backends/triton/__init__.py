"""Triton backend: fused search, straight-through backward and segment sum.

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how the test
suite exercises these kernels on a machine without a GPU. Nothing here touches
the GPU or builds an autotuning config at import.
"""
from __future__ import annotations

import functools
import os

import torch

from . import backward as _backward
from . import search as _search
from . import segment_sum as _segment_sum
from .backward import backward, launch_backward
from .lfq_entropy import launch_lfq_entropy as lfq_entropy
from .lfq_entropy import launch_lfq_entropy_backward as lfq_entropy_backward
from .search import launch_sample, launch_search, sample, search
from .segment_sum import launch_segment_sum, segment_sum

__all__ = ["availability", "centred_ranking", "tiles", "search", "launch_search", "sample", "launch_sample", "backward",
           "launch_backward", "segment_sum", "launch_segment_sum",
           "lfq_entropy", "lfq_entropy_backward"]


def centred_ranking(device, z_dtype, codebook_dtype) -> bool:
    """fp32 dots rank in the frame centred on the rows; fp16/bf16 z and codebook of one
    dtype go to tl.dot as they are (search.py)."""
    return not (z_dtype == codebook_dtype and z_dtype in (torch.float16, torch.bfloat16))


def availability(device: torch.device) -> tuple[bool, str]:
    """(True, reason) when the Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is present"
        return True, "Triton kernels compiled for the CUDA device"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return False, "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"
    return False, f"Triton runs on CUDA tensors, not on {device.type}"


def tiles(device: torch.device, z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> dict:
    """How the kernels cut such inputs (see ``vqkern.backends``): the interpreter's single
    configs on CPU; on a GPU the largest autotuned search tile, the split-K rule of
    ``search._choose_splits`` and the GPU blocks of the backward and segment sums.
    VQKERN_TRITON_NUM_SPLITS (a forced split count) is a code path of its own."""
    forced = os.environ.get("VQKERN_TRITON_NUM_SPLITS", "").strip()
    # d_block: the widest D chunk of any kernel, the interpreter's backward and segment sums
    # (128; its search takes 64) and the GPU search's tensor-core z tile (up to 128).
    if torch.device(device).type != "cuda":
        out = dict(path="interpreter", rows=_search.INTERPRET_BLOCK_M, codes=_search.INTERPRET_BLOCK_N,
                   d_block=128, backward_rows=_backward.INTERPRET_BLOCK_M, piece=_segment_sum.INTERPRET_PIECE,
                   sample_tiles=True)
    else:
        dot_fp32 = z_dtype != codebook_dtype or z_dtype == torch.float32
        precision = _search._fp32_precision() if dot_fp32 else "tensor cores"
        recheck = " + ieee re-check" if dot_fp32 and precision != "ieee" and _search._recheck_enabled() else ""
        device = torch.device(device)
        rows, codes = _largest_search_tile()
        # _choose_splits: the codes are split while the row blocks are fewer than two per SM.
        sms = _search._sm_count(device.index if device.index is not None else torch.cuda.current_device())
        out = dict(path=f"GPU, {'fp32 dots ' + precision if dot_fp32 else precision}{recheck}", rows=rows,
                   codes=codes, split_rows=_search.SPLIT_BLOCK_M * (2 * sms - 1),
                   split_codes=_search.MIN_CODES_PER_SPLIT, d_block=128, backward_rows=_backward.GPU_BLOCK_M,
                   piece=_segment_sum.GPU_PIECE, sample_tiles=True)
    if forced:  # every search splits the code tiles this many ways, some splits maybe empty
        out.update(path=out["path"] + f", {forced} splits (VQKERN_TRITON_NUM_SPLITS)",
                   split_rows=max(out["rows"], out.get("split_rows", 0)), split_codes=out["codes"])
    return out


@functools.lru_cache(maxsize=1)
def _largest_search_tile() -> tuple[int, int]:
    configs = _search._search_configs()
    return max(c.kwargs["BLOCK_M"] for c in configs), max(c.kwargs["BLOCK_N"] for c in configs)
