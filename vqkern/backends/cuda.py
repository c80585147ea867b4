"""CUDA C++ backend: a thin wrapper over the compiled extension ``vqkern._C``.

The extension is imported lazily, on the first availability check or launch,
never when vqkern is imported; a failed import is kept and reported as the
availability reason. The kernels (csrc/) take raw device pointers, sizes, dtype
codes and the current stream, so this module allocates the small workspaces
(code norms, split-K partials, the deterministic segment-sum pieces) with torch
and passes pointers. Launchers check only what would otherwise crash the
process (device, contiguity, dtype): argument validation proper happens once in
``vqkern.functional``.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from ._frame import frame_centre

# Shared with csrc/common.cuh (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HALF = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA; CMake targets sm_80 and sm_90a

_ext: ModuleType | None = None
_ext_error: str | None = None


def _load() -> ModuleType | None:
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("vqkern._C")
        except ModuleNotFoundError as exc:
            if exc.name != "vqkern._C":
                _ext_error = f"vqkern._C failed to load: {type(exc).__name__}: {exc}"
            else:
                _ext_error = (f"vqkern._C not built: {exc} (install with nvcc on PATH, "
                              "without VQKERN_SKIP_CUDA_BUILD=1)")
        except Exception as exc:  # e.g. an undefined symbol or a driver too old
            _ext_error = f"vqkern._C failed to load: {type(exc).__name__}: {exc}"
    return _ext


def availability(device: torch.device) -> tuple[bool, str]:
    """(True, reason) on a CUDA device of compute capability >= 8.0 with vqkern._C loaded."""
    device = torch.device(device)
    if _load() is None:
        return False, str(_ext_error)
    if device.type != "cuda":
        return False, f"the CUDA backend takes CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        return False, f"vqkern._C targets sm_80 and newer, got sm_{capability[0]}{capability[1]}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok, detail = _probe(index)
    if not ok:
        return False, f"vqkern._C cannot run on {device}: {detail}"
    return True, f"vqkern._C loaded (CUDA runtime {_ext.CUDA_VERSION}; {detail})"


@functools.cache
def _probe(index: int) -> tuple[bool, str]:
    # Once per device: a binary without an image for this GPU, or a driver older than
    # the toolkit that built it, shows here rather than at the first launch.
    try:
        return True, _ext.probe(index)
    except RuntimeError as exc:
        return False, str(exc)


def centred_ranking(device, z_dtype, codebook_dtype) -> bool:
    """The fp32 FMA kernel ranks in the frame centred on the rows; fp16/bf16 z and
    codebook of one dtype go to the tensor-core kernel, which multiplies them as they are."""
    return not (z_dtype == codebook_dtype and z_dtype in _HALF)


def _require() -> ModuleType:
    ext = _load()
    if ext is None:
        raise RuntimeError(f"cuda backend: {_ext_error}")
    return ext


def _check(name: str, t: torch.Tensor, device: torch.device, dtypes=None) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"cuda backend: {name} must be a CUDA tensor, got a tensor on {t.device} "
                         "(the CUDA backend takes CUDA tensors; use backend='torch' or 'triton' on CPU)")
    if t.device != device:
        raise ValueError(f"cuda backend: {name} is on {t.device}, expected {device} like z")
    if not t.is_contiguous():
        raise ValueError(f"cuda backend: {name} must be contiguous")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"cuda backend: {name} must have dtype in {[str(x) for x in dtypes]}, got {t.dtype}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Codes per tile of the search kernels (kCodes in csrc/search.cu).
CODES_PER_TILE = 64
# A D chunk for the self-check to cross: 64 spans two of the search's chunks (16 deep for
# fp32, 32 for tensor cores) and of the backward's 32-lane warp rows.
D_BLOCK = 64


def choose_splits(n: int, k: int, sm_count: int, rows_per_block: int = 64,
                  codes_per_tile: int = CODES_PER_TILE) -> int:
    """Split-K factor: divide the codes among blocks when the row blocks alone
    cannot fill the GPU (about two blocks per SM), keeping >= 4 code tiles per split."""
    row_blocks = -(-n // rows_per_block)
    tiles = -(-k // codes_per_tile)
    target = 2 * sm_count
    if row_blocks >= target:
        return 1
    return max(1, min(-(-target // row_blocks), tiles // 4, 65535))


def search(z, codebook, indices, distances, quantized, *, splits: int | None = None,
           tensor_cores: bool | None = None) -> None:
    """Nearest code per row. z (N, D), codebook (K, D) float32/float16/bfloat16 (may differ);
    writes indices (N,) int64, distances (N,) float32, quantized (N, D) in z's dtype.
    ``splits`` forces the split-K factor; ``tensor_cores`` (default: z and codebook both
    fp16 or both bf16) picks the WMMA kernel over the fp32 FMA kernel."""
    ext = _require()
    device = z.device
    _check("z", z, device, _DTYPE_CODES)
    _check("codebook", codebook, device, _DTYPE_CODES)
    _check("indices", indices, device, (torch.int64,))
    _check("distances", distances, device, (torch.float32,))
    _check("quantized", quantized, device, (z.dtype,))
    n, d = z.shape
    k = codebook.shape[0]
    if k >= 2**31:
        raise ValueError(f"cuda backend: codebook has {k} codes; at most 2^31 - 1 are supported")
    if n == 0:
        return
    index = _index(device)
    if splits is None:
        splits = choose_splits(n, k, _sm_count(index), ext.SEARCH_ROWS)
    if splits < 1:
        raise ValueError(f"cuda backend: splits must be >= 1, got {splits}")
    if tensor_cores is None:
        tensor_cores = z.dtype == codebook.dtype and z.dtype in _HALF
    # The fp32 kernel ranks in the frame centred on the rows; the tensor-core one
    # multiplies the 16-bit inputs as they are (csrc/search.cu).
    mma = tensor_cores and z.dtype == codebook.dtype and z.dtype in _HALF
    centre = None if mma else frame_centre(z)
    norms = torch.empty(k, dtype=torch.float32, device=device)
    part_scores = torch.empty((splits, n), dtype=torch.float32, device=device)
    part_index = torch.empty((splits, n), dtype=torch.int32, device=device)
    ext.search(index, z.data_ptr(), _DTYPE_CODES[z.dtype], codebook.data_ptr(),
               _DTYPE_CODES[codebook.dtype], n, k, d, 0 if centre is None else centre.data_ptr(),
               norms.data_ptr(), part_scores.data_ptr(),
               part_index.data_ptr(), splits, bool(tensor_cores), indices.data_ptr(),
               distances.data_ptr(), quantized.data_ptr(), _stream(device))


def tiles(device: torch.device, z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> dict:
    """How the kernels cut such inputs (see ``vqkern.backends``), from the launcher's
    constants: SEARCH_ROWS-row blocks, CODES_PER_TILE-code tiles, choose_splits' split-K
    (while the row blocks are fewer than two per SM, at least 4 tiles a split), and
    SEGMENT_CHUNK_ROWS-row pieces of the deterministic segment sum."""
    ext = _require()
    tensor_cores = z_dtype == codebook_dtype and z_dtype in _HALF
    rows = ext.SEARCH_ROWS
    sms = _sm_count(_index(torch.device(device)))
    return dict(path="tensor cores" if tensor_cores else "fp32 FMA", rows=rows, codes=CODES_PER_TILE,
                split_rows=rows * (2 * sms - 1), split_codes=4 * CODES_PER_TILE, d_block=D_BLOCK,
                backward_rows=rows, piece=ext.SEGMENT_CHUNK_ROWS)


def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic) -> None:
    """grad_z (N, D) in z's dtype = grad_quantized - scale * (e - z) and diff_sums (K, D) f32
    += per-code sums of e - z, from one pass (atomics); with ``deterministic`` grad_z from
    the same kernel and diff_sums from the fixed-order segment sum. scale: (1,) f32 on the
    device (never read on the host). None skips an output."""
    ext = _require()
    device = z.device
    _check("z", z, device, _DTYPE_CODES)
    _check("codebook", codebook, device, _DTYPE_CODES)
    _check("indices", indices, device, (torch.int64,))
    _check("scale", scale, device, (torch.float32,))
    if grad_z is not None:
        _check("grad_quantized", grad_quantized, device, _DTYPE_CODES)
        _check("grad_z", grad_z, device, (z.dtype,))
    if diff_sums is not None:
        _check("diff_sums", diff_sums, device, (torch.float32,))
    n, d = z.shape
    if n == 0 or (grad_z is None and diff_sums is None):
        return
    index = _index(device)
    atomic_sums = diff_sums is not None and not deterministic
    if grad_z is not None or atomic_sums:
        ext.backward(index, grad_quantized.data_ptr() if grad_z is not None else 0,
                     _DTYPE_CODES[grad_quantized.dtype], z.data_ptr(), _DTYPE_CODES[z.dtype],
                     codebook.data_ptr(), _DTYPE_CODES[codebook.dtype], indices.data_ptr(), n, d,
                     scale.data_ptr(), grad_z.data_ptr() if grad_z is not None else 0,
                     diff_sums.data_ptr() if atomic_sums else 0, _stream(device))
    if diff_sums is not None and deterministic:
        _sorted_segment_sum(ext, indices, z, None, diff_sums, base=codebook)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sorted_segment_sum(ext, indices, values, counts, sums, base=None) -> None:
    n, d = values.shape
    sorted_idx, perm = torch.sort(indices, stable=True)
    chunks = -(-n // ext.SEGMENT_CHUNK_ROWS)
    partial = torch.empty((2 * chunks, d), dtype=torch.float32, device=values.device)
    ext.segment_sum_sorted(_index(values.device), sorted_idx.data_ptr(), perm.data_ptr(), values.data_ptr(),
                           _DTYPE_CODES[values.dtype], base.data_ptr() if base is not None else 0,
                           _DTYPE_CODES[base.dtype] if base is not None else 0, n, d, sums.shape[0],
                           counts.data_ptr() if counts is not None else 0, sums.data_ptr(),
                           partial.data_ptr(), _stream(values.device))


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    """counts (K,) f32 += per-code row counts; sums (K, D) f32 += per-code sums of values (N, D).

    deterministic=False: fp32 atomics. deterministic=True: a stable torch.sort of the
    indices, then a fixed-order reduction (bitwise-identical across runs)."""
    ext = _require()
    device = values.device
    _check("values", values, device, _DTYPE_CODES)
    _check("indices", indices, device, (torch.int64,))
    _check("counts", counts, device, (torch.float32,))
    _check("sums", sums, device, (torch.float32,))
    n, d = values.shape
    if n == 0:
        return
    if not deterministic:
        ext.segment_sum_atomic(_index(device), indices.data_ptr(), values.data_ptr(), _DTYPE_CODES[values.dtype],
                               n, d, counts.data_ptr(), sums.data_ptr(), _stream(device))
        return
    _sorted_segment_sum(ext, indices, values, counts, sums)


# LFQ's entropy terms (vqkern.lfq_entropy) have no CUDA C++ kernel: the cuda backend
# runs the Triton kernels, imported at the first call (importing triton at load time
# would make this backend depend on it for every op).
def lfq_entropy(x, scale, eps, entropy, prob_sum) -> None:
    from .triton import lfq_entropy as run
    run(x, scale, eps, entropy, prob_sum)


def lfq_entropy_backward(x, scale, eps, grad_entropy, grad_prob_sum, grad_x) -> None:
    from .triton import lfq_entropy_backward as run
    run(x, scale, eps, grad_entropy, grad_prob_sum, grad_x)
