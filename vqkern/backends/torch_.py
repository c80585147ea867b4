"""Chunked PyTorch backend: any device, bounded memory.

The search ranks codes with the expansion ``|e|^2 - 2 z.e`` (|z|^2 is constant
per row and does not change the argmin) one (rows x codes) tile at a time, in the
frame centred on the rows (z - c and e - c, c the mean of the finite rows, so that
the fp32 rounding scales with the distance of the rows and their nearest codes from c,
not from the origin; ``_frame.py``), then recomputes the chosen code's distance exactly from the
residual, as the op contract requires. Peak extra memory is one tile plus O(N) vectors, whatever
N x K is (benchmarks/NOTES.md has the measurements behind the tile sizes).

On CPU the tile is small enough to stay in cache and lives in one preallocated
buffer (a fresh 64 MB block per chunk cost page faults on every chunk), and the
per-row argmin is done in two levels, because ``argmin(dim=1)`` runs at about
1 G elements/s on 2 cores while ``amin`` runs at about 10 G elements/s: ``amin``
over groups of ``G`` codes, ``argmin`` over the group minima, then ``argmin``
inside the winning group. The first minimal group holds the first minimal code,
so ties still go to the lowest index.

On x86-64 CPUs with AVX2 the search instead runs the fused C++ kernel of the
extension ``vqkern._cpu`` (csrc/cpu/): scores are folded into the running argmin
in registers, no tile is written, rows are shared out between threads
dynamically. The kernel's instruction set is chosen from the CPU (cpuid and the
OS's saved register state): ``avx2`` (AVX2 + FMA), ``avx512`` (AVX512F/DQ/BW/VL),
``avx512bf16`` (also AVX512-BF16) or ``amx`` (also AMX-BF16 tiles). The last two
search bf16 z and codebook as bf16: bf16 products are exact in fp32 and summed in
fp32, so the precision policy holds, with a bound relative to |z|^2 + |e|^2 (they
rank in the origin's frame; the fp32 kernels, like the tiled path, rank in the frame
centred on the rows: ``centred_ranking``). ``VQKERN_CPU_ISA=avx2|avx512|avx512bf16|amx``
forces one (an error names the variable if the CPU lacks it);
``VQKERN_CPU_KERNEL=0`` forces the tiled PyTorch path; ``cpu_kernel()`` says
which path runs and why. ``cpu_backward`` is the extension's one-pass fp32
backward (grad_z and the per-code residual sums).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from .._gumbel import gumbel_, logits
from ._frame import frame_centre

# Non-CPU devices: one (rows x K) block of at most this many bytes per step.
DEFAULT_BLOCK_BYTES = 64 * 2**20
# CPU tile, rows x codes (fp32): 1024 x 1024 = 4 MB stays in L2+L3 and keeps
# MKL's GEMM near its large-matrix rate (benchmarks/NOTES.md, step 2).
CPU_TILE_ROWS = 1024
CPU_TILE_CODES = 1024
CPU_GROUP = 32


# The kernel paths of vqkern._cpu, in increasing order of what they need.
CPU_ISAS = ("avx2", "avx512", "avx512bf16", "amx")
# The paths that search bf16 z and codebook as bf16 (any other dtype mix is widened to fp32).
BF16_ISAS = ("avx512bf16", "amx")
_ISA_TEXT = {"avx2": "AVX2 + FMA", "avx512": "AVX-512", "avx512bf16": "AVX-512, bf16 inputs via AVX512-BF16",
             "amx": "AVX-512, bf16 inputs via AMX-BF16 tiles"}


@functools.lru_cache(maxsize=1)
def _load_cpu_ext():
    """(module or None, reason)."""
    try:
        ext = importlib.import_module("vqkern._cpu")
    except ImportError as exc:
        if getattr(exc, "name", None) == "vqkern._cpu":
            return None, (f"vqkern._cpu not built ({exc}): install with cmake on PATH, "
                          "without VQKERN_SKIP_CPU_BUILD=1, on x86-64")
        return None, f"vqkern._cpu failed to load: {type(exc).__name__}: {exc}"
    if not hasattr(ext, "isa_missing"):
        return None, f"vqkern._cpu at {ext.__file__} predates its ISA paths: rebuild it (setup.py build_ext)"
    if not ext.supported():
        return None, f"this CPU lacks what vqkern._cpu needs: {ext.isa_missing('avx2')}"
    return ext, "fused C++ kernel vqkern._cpu"


def cpu_isa_missing(isa: str) -> str:
    """'' when vqkern._cpu's ``isa`` path can run here, else what is missing."""
    ext, reason = _load_cpu_ext()
    return reason if ext is None else ext.isa_missing(isa)


def _cpu_isa(ext) -> str:
    """The kernel path in use: VQKERN_CPU_ISA if set (checked), else the best the CPU runs."""
    want = os.environ.get("VQKERN_CPU_ISA", "").strip().lower()
    if not want:
        best = ext.best_isa()
        # vdpbf16ps searched bf16 at 0.55-0.65x of the fp32 AVX-512 kernel on widened
        # inputs (Sapphire Rapids, one thread: 61-75 against 114-129 GFLOP/s), so without
        # AMX bf16 is widened unless VQKERN_CPU_ISA=avx512bf16 asks for it.
        return "avx512" if best == "avx512bf16" else best
    if want not in CPU_ISAS:
        raise ValueError(f"VQKERN_CPU_ISA={want!r}: choose from {', '.join(CPU_ISAS)} (or unset it)")
    missing = cpu_isa_missing(want)
    if missing:
        raise ValueError(f"VQKERN_CPU_ISA={want}: this CPU cannot run it, it lacks {missing}")
    return want


def _active_cpu_ext():
    """(vqkern._cpu when CPU searches use it, else None; its ISA path or None; the reason)."""
    if os.environ.get("VQKERN_CPU_KERNEL", "1").strip() == "0":
        return None, None, "VQKERN_CPU_KERNEL=0: tiled PyTorch path"
    ext, reason = _load_cpu_ext()
    if ext is None:
        return None, None, reason
    isa = _cpu_isa(ext)
    return ext, isa, f"{reason} ({isa}: {_ISA_TEXT[isa]}; {ext.threading()} threads)"


def cpu_kernel() -> tuple[bool, str]:
    """Whether CPU searches run the fused C++ kernel, and its ISA path (or why not).

    Raises ValueError when VQKERN_CPU_ISA names an unknown path or one this CPU lacks."""
    ext, _, reason = _active_cpu_ext()
    return ext is not None, reason


def centred_ranking(device: torch.device, z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> bool:
    """Whether a search of these dtypes on ``device`` ranks in the frame centred on the
    codebook (vqkern.backends.centred_ranking). Every path does but the C++ kernel's bf16
    paths (avx512bf16, amx) for bf16 z and codebook."""
    if torch.device(device).type != "cpu" or not (z_dtype == codebook_dtype == torch.bfloat16):
        return True
    ext, isa, _ = _active_cpu_ext()
    return ext is None or isa not in BF16_ISAS


def availability(device: torch.device) -> tuple[bool, str]:
    if torch.device(device).type == "cpu":
        try:
            ok, reason = cpu_kernel()
        except ValueError as exc:  # a bad VQKERN_CPU_ISA: the search raises it, the report shows it
            return True, f"plain PyTorch runs on every device; CPU search raises: {exc}"
        cpu_path = reason if ok else f"tiled PyTorch ({reason})"
        return True, f"plain PyTorch runs on every device; CPU search: {cpu_path}"
    return True, "plain PyTorch runs on every device"


def _block_bytes() -> int:
    return int(os.environ.get("VQKERN_TORCH_BLOCK_BYTES", DEFAULT_BLOCK_BYTES))


def _cpu_tile() -> tuple[int, int, int]:
    rows = int(os.environ.get("VQKERN_TORCH_TILE_ROWS", CPU_TILE_ROWS))
    codes = int(os.environ.get("VQKERN_TORCH_TILE_CODES", CPU_TILE_CODES))
    group = int(os.environ.get("VQKERN_TORCH_GROUP", CPU_GROUP))
    if min(rows, codes, group) < 1:
        raise ValueError("VQKERN_TORCH_TILE_ROWS, _TILE_CODES and _GROUP must be >= 1")
    return rows, codes, group


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """fp32 matmuls in full fp32 on CUDA, whatever ``torch.set_float32_matmul_precision``
    says: TF32 scores rank a near-tie wrongly by ~1e-3 of |z|^2 + |e|^2."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda" or not hasattr(matmul, "fp32_precision"):
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def residual_distance(z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 ``sum((z - e)^2)`` in fp32, row by row."""
    diff = z.float() - chosen.float()
    return (diff * diff).sum(dim=1)


def _row_argmin(scores: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min value, first index of it) along dim 1 of a (r, c) float tensor."""
    r, c = scores.shape
    main = (c // group) * group
    if main == 0:
        return scores.min(dim=1)
    grouped = scores[:, :main].view(r, main // group, group) if main < c else scores.view(r, c // group, group)
    # min(dim) gives value and first index in one pass; it runs on 1/group of the data.
    value, gidx = grouped.amin(dim=2).min(dim=1)
    inner = grouped.gather(1, gidx.view(r, 1, 1).expand(r, 1, group)).view(r, group).argmin(dim=1)
    index = torch.add(inner, gidx, alpha=group)
    if main < c:
        # The tail's indices are all higher: it wins only when strictly smaller.
        tval, tidx = scores[:, main:].min(dim=1)
        better = tval < value
        value = torch.where(better, tval, value)
        index = torch.where(better, tidx + main, index)
    return value, index


_INF = float("inf")


def _never_win(scores: torch.Tensor) -> torch.Tensor:
    """Non-finite scores (a NaN or infinite code: NaN, or inf - inf) become +inf in place:
    torch's min and argmin return a NaN as the minimum, so a NaN code would win."""
    return scores.nan_to_num_(nan=_INF, posinf=_INF, neginf=_INF)


def _search_cpu(z, cb, cb_norm, indices, centre) -> None:
    """z (N, D) float, cb (K, D) fp32 and cb_norm (K,) in the frame centred on ``centre``
    (cb = codebook - centre): each tile of rows of z is moved into the frame as it is searched."""
    n, k = z.shape[0], cb.shape[0]
    # Only a non-finite code norm can give a finite row a NaN score (a NaN row of z may
    # take any index): checked once per call, so finite codebooks skip the extra pass.
    sanitize = not bool(torch.isfinite(cb_norm).all())
    tile_rows, tile_codes, group = _cpu_tile()
    tile_rows, tile_codes = min(tile_rows, n), min(tile_codes, k)
    buffer = torch.empty(tile_rows * tile_codes, dtype=cb.dtype)
    for start in range(0, n, tile_rows):
        stop = min(n, start + tile_rows)
        zc = z[start:stop].float() - centre
        best_val = best_idx = None
        for k0 in range(0, k, tile_codes):
            k1 = min(k, k0 + tile_codes)
            scores = buffer[: (stop - start) * (k1 - k0)].view(stop - start, k1 - k0)
            torch.addmm(cb_norm[k0:k1], zc, cb[k0:k1].t(), beta=1.0, alpha=-2.0, out=scores)
            if sanitize:
                _never_win(scores)
            val, idx = _row_argmin(scores, group)
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                # Earlier code blocks win ties: replace only on a strictly smaller score.
                better = val < best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx + k0, best_idx)
        indices[start:stop] = best_idx


def _search_blocked(z, codebook, indices) -> None:
    """Generic path (any device): fp32 scores of (rows x K) blocks, TF32 off, in the frame
    centred on the rows (vqkern.backends._frame).

    Ranking in the inputs' half precision would put the scores' rounding (about
    3e-4 of |z|^2 + |e|^2 in bf16) above the policy's 1e-5 bound."""
    centre = frame_centre(z)
    cb = codebook.float() - centre
    cb_norm = (cb * cb).sum(dim=1)
    n, k = z.shape[0], cb.shape[0]
    rows = max(1, min(n, _block_bytes() // (4 * k)))
    with _ieee_fp32_matmul(z.device):
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            scores = torch.addmm(cb_norm, z[start:stop].float() - centre, cb.t(), beta=1.0, alpha=-2.0)
            # Always (no host read of the norms on a GPU): one pass over the block.
            indices[start:stop] = _never_win(scores).argmin(dim=1)


def _kernel_search(ext, isa, z, codebook, indices, distances, quantized) -> bool:
    """Search with vqkern._cpu; True when its fused epilogue also wrote distances and quantized.

    bf16 z and codebook are searched as bf16 on the avx512bf16 and amx paths; any other
    mix is widened to fp32 (the kernel reads fp32 rows through data pointers)."""
    if indices.dtype != torch.int64 or not indices.is_contiguous():
        raise RuntimeError("vqkern._cpu.search_l2 needs contiguous int64 indices")
    threads = torch.get_num_threads()
    if isa in BF16_ISAS and z.dtype == codebook.dtype == torch.bfloat16:
        zs, cb = z.contiguous(), codebook.contiguous()
        fused = quantized.dtype == torch.bfloat16 and quantized.is_contiguous() and distances.is_contiguous()
        ext.search_l2_bf16(zs.data_ptr(), zs.shape[0], zs.stride(0), cb.data_ptr(), cb.shape[0], cb.stride(0),
                           zs.shape[1], indices.data_ptr(), distances.data_ptr() if fused else 0,
                           quantized.data_ptr() if fused else 0, quantized.stride(0), threads, isa)
        return fused
    zs, cb = z.float().contiguous(), codebook.float().contiguous()
    # fp32 in and out: the kernel also writes the exact distance and the code row
    # while the row is in cache; other dtypes take the epilogue in search().
    fused = (z.dtype == codebook.dtype == quantized.dtype == torch.float32 and quantized.is_contiguous()
             and distances.is_contiguous())
    args = (zs.data_ptr(), zs.shape[0], zs.stride(0), cb.data_ptr(), cb.shape[0], cb.stride(0), zs.shape[1],
            indices.data_ptr(), distances.data_ptr() if fused else 0, quantized.data_ptr() if fused else 0,
            quantized.stride(0), threads)
    ext.search_l2(*args, isa)
    return fused


def _to_first_copies(codebook, indices) -> None:
    """Map each index to the lowest index of a code identical to it, in place.

    The tiled paths score codes with BLAS, which may round identical columns differently
    (MKL's sgemm did, for a column past its micro-kernel's width: 21 of 61 rows scored a
    copy lower), so the lowest-index rule for identical codes is enforced here. Identical
    codes have bitwise-equal squared norms, so only codes sharing a norm are compared:
    one sort of K norms, usually nothing more."""
    norms = codebook.float().square().sum(dim=1)
    order = torch.argsort(norms, stable=True)
    same = norms[order][1:] == norms[order][:-1]
    if not bool(same.any()):
        return
    in_run = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    in_run[1:] |= same
    in_run[:-1] |= same
    cand = order[in_run]
    _, group = torch.unique(codebook[cand], dim=0, return_inverse=True)
    first = torch.full((cand.shape[0],), codebook.shape[0], dtype=torch.int64, device=cand.device)
    first = first.scatter_reduce(0, group, cand, "amin")
    mapping = torch.arange(codebook.shape[0], device=cand.device)
    mapping[cand] = first[group]
    indices.copy_(mapping[indices])


@torch.no_grad()  # out= ops refuse inputs that require grad; the search has no gradient
def search(z, codebook, indices, distances, quantized) -> None:
    ext, isa, _ = _active_cpu_ext() if z.device.type == "cpu" else (None, None, "")
    if ext is not None:
        if _kernel_search(ext, isa, z, codebook, indices, distances, quantized):
            return
    elif z.device.type == "cpu":
        centre = frame_centre(z)
        cb = codebook.float() - centre
        _search_cpu(z, cb, (cb * cb).sum(dim=1), indices, centre)
        _to_first_copies(codebook, indices)
    else:
        _search_blocked(z, codebook, indices)
        _to_first_copies(codebook, indices)
    chosen = codebook.index_select(0, indices)
    distances.copy_(residual_distance(z, chosen))
    quantized.copy_(chosen)


# A tile of logits and noise in the sampling loop stays under this many bytes.
SAMPLE_TILE_BYTES = 16 << 20


@torch.no_grad()
def sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized) -> None:
    """Gumbel-max over code tiles: the argmax of logit / T + G kept as a running
    (best, index) per row, one (rows x codes) tile of noise at a time, never N x K.
    The noise comes from a torch.Generator seeded with ``seed`` on z's device."""
    n, k = z.shape[0], codebook.shape[0]
    x, cb = z.float(), codebook.float()
    generator = torch.Generator(device=z.device)
    generator.manual_seed(int(seed))
    budget = max(1, int(os.environ.get("VQKERN_SAMPLE_TILE_BYTES", SAMPLE_TILE_BYTES)) // 4)
    tile_codes = max(1, min(k, budget // max(1, min(n, 1024))))
    tile_rows = max(1, min(n, budget // tile_codes))
    with _ieee_fp32_matmul(z.device):
        for r0 in range(0, n, tile_rows):
            xr = x[r0:r0 + tile_rows]
            xr_sq = xr.square().sum(-1)
            best = torch.full((xr.shape[0],), -_INF, device=z.device)
            best_idx = indices[r0:r0 + tile_rows].zero_()
            for c0 in range(0, k, tile_codes):
                scores = logits(xr, xr_sq, cb[c0:c0 + tile_codes], cosine).mul_(inv_temperature)
                scores.add_(gumbel_(torch.empty_like(scores), generator))
                tile_best, tile_idx = scores.nan_to_num_(nan=-_INF, posinf=-_INF, neginf=-_INF).max(dim=1)
                # Strictly greater: an exact tie keeps the earlier (lower) code, as argmax does.
                better = tile_best > best
                best = torch.where(better, tile_best, best)
                best_idx.copy_(torch.where(better, tile_idx + c0, best_idx))
    chosen = codebook.index_select(0, indices)
    distances.copy_(residual_distance(z, chosen))
    quantized.copy_(chosen)


def cpu_backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic) -> bool:
    """The straight-through backward in one pass with vqkern._cpu, if it can take these tensors.

    Shapes: grad_quantized, z, grad_z (N, D); codebook, diff_sums (K, D); indices (N,)
    int64 in [0, K). Writes grad_z = grad_quantized + scale * (z - codebook[indices])
    (``grad_z`` None: skipped; ``grad_quantized`` may then be None) and adds
    ``diff_sums[k] += sum_{i: idx_i = k} (codebook[k] - z_i)`` (zero-filled by the
    caller; None: skipped), the difference formed once per element in fp32. ``scale``
    is a float or a one-element tensor. The sums are bitwise reproducible for any
    thread count, so ``deterministic`` needs nothing more.

    Returns False, touching nothing, when the kernel cannot take the call (extension
    missing or disabled, a non-CPU tensor, rows other than all fp32 or all bf16 (z,
    codebook, grad_quantized, grad_z; diff_sums is fp32), indices other than int64, a
    non-contiguous tensor): the caller then runs its PyTorch path. bf16 rows are
    widened exactly, the arithmetic is fp32 and grad_z is rounded once to bf16. Raises
    ValueError on mismatched shapes and IndexError (before any write) on an index
    outside [0, K).
    """
    ext = _active_cpu_ext()[0]
    if ext is None or (grad_z is None and diff_sums is None):
        return False
    n, d = z.shape
    k = codebook.shape[0]
    floats = [("z", z, (n, d)), ("codebook", codebook, (k, d))]
    if grad_z is not None:
        floats += [("grad_quantized", grad_quantized, (n, d)), ("grad_z", grad_z, (n, d))]
    if diff_sums is not None:
        floats.append(("diff_sums", diff_sums, (k, d)))
    for name, t, shape in floats:
        if t is None:
            raise ValueError(f"cpu_backward: {name} is required")
        if tuple(t.shape) != shape:
            raise ValueError(f"cpu_backward: {name} has shape {tuple(t.shape)}, expected {shape}")
    if indices.shape != (n,):
        raise ValueError(f"cpu_backward: indices has shape {tuple(indices.shape)}, expected ({n},)")
    if any(t.device.type != "cpu" or not t.is_contiguous() for _, t, _ in floats):
        return False
    if indices.device.type != "cpu" or indices.dtype != torch.int64 or not indices.is_contiguous():
        return False
    if diff_sums is not None and diff_sums.dtype != torch.float32:
        return False
    row_dtypes = {t.dtype for name, t, _ in floats if name != "diff_sums"}
    kernel = {frozenset({torch.float32}): ext.backward_l2,
              frozenset({torch.bfloat16}): ext.backward_l2_bf16}.get(frozenset(row_dtypes))
    if kernel is None:
        return False
    s = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.detach().reshape(-1)[0])
    gq = grad_quantized.data_ptr() if grad_z is not None else 0
    kernel(gq, z.data_ptr(), codebook.data_ptr(), indices.data_ptr(), n, d, k, s,
                    grad_z.data_ptr() if grad_z is not None else 0,
                    diff_sums.data_ptr() if diff_sums is not None else 0, bool(deterministic), torch.get_num_threads())
    return True


def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic) -> None:
    """One pass forms the difference e - z (in grad_z's buffer when everything is fp32),
    adds it into diff_sums per code, then turns it into grad_z in place. On CPU with fp32
    tensors vqkern._cpu does it in one fused pass (bitwise reproducible whatever the
    thread count, so deterministic or not)."""
    if z.device.type == "cpu":
        if cpu_backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic):
            return
        if _active_cpu_ext()[0] is not None:
            # fp16 or mixed dtypes: widened to fp32 for the fused kernel (all-bf16 calls
            # took the kernel's bf16 entry above). index_add_ of the PyTorch path took
            # 400 ms against 45 ms for fp32 at 16384 x 16384 x 256 bf16 (2 threads, load
            # 9-13): its CPU kernel scales badly with threads.
            out = None if grad_z is None else torch.empty(grad_z.shape, dtype=torch.float32)
            gq = None if grad_z is None else grad_quantized.float().contiguous()
            if cpu_backward(gq, z.float().contiguous(), codebook.float().contiguous(), indices.contiguous(), scale,
                            out, diff_sums, deterministic):
                if grad_z is not None:
                    grad_z.copy_(out)
                return
    fp32 = z.dtype == codebook.dtype == grad_quantized.dtype == torch.float32
    if grad_z is not None and fp32:
        # Each fresh (N, D) temporary costs its page faults on CPU (2-3 ms per 16 MB
        # here), so the difference lives in the output (benchmarks/NOTES.md, CPU backward).
        diff = torch.index_select(codebook, 0, indices, out=grad_z)
        diff.sub_(z)
    else:
        diff = codebook.index_select(0, indices).float().sub_(z.float())
    if diff_sums is not None:
        add_per_code(diff_sums, indices, diff, deterministic)
    if grad_z is None:
        return
    # grad_quantized - scale * (e - z) in one pass; scale stays a (1,) tensor (no host read).
    if diff.dtype == grad_z.dtype and diff.data_ptr() == grad_z.data_ptr():
        torch.addcmul(grad_quantized, diff, scale, value=-1.0, out=grad_z)
    else:
        grad_z.copy_(torch.addcmul(grad_quantized.float(), diff, scale, value=-1.0))


@contextlib.contextmanager
def _deterministic(device: torch.device, on: bool):
    """index_add_ is sequential on CPU; on CUDA its deterministic kernel is chosen by
    the global flag, so set it for the call when the caller asks for reproducibility.
    The flag is process-wide: another thread running meanwhile (a second device's
    autograd thread) sees it too. The backward never flips it (it passes the global
    setting); only an explicit ``segment_sum(..., deterministic=True)`` on CUDA does."""
    if not on or device.type == "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


# Rows converted to fp64 per step of add_per_code: bounds its temporary to 8 MB.
SUM_CHUNK_ELEMENTS = 1 << 20


def add_per_code(sums, indices, values, deterministic) -> None:
    """sums (K, D) fp32 += per-code sums of values (N, D), accumulated in fp64, rounded once.

    A running fp32 sum of many rows of one code errs like the rows: residuals e - z of
    half-precision rows share the code's low-order bits and round the same way at every
    step (166 fp32 ulps of sum|e - z| at 10^5 fp16 rows, PyTorch autograd 1.5;
    tests/test_precision.py). In fp64 the order of the additions is immaterial: the
    result is the fp32 rounding of the sum up to n * 2^-53. index_add_ is sequential on
    CPU; on CUDA its deterministic kernel is taken when the caller asks for one."""
    acc = torch.zeros(sums.shape, dtype=torch.float64, device=sums.device)
    step = max(1, SUM_CHUNK_ELEMENTS // max(1, values.shape[1]))
    with _deterministic(sums.device, deterministic):
        for start in range(0, values.shape[0], step):
            acc.index_add_(0, indices[start:start + step], values[start:start + step].double())
    sums.add_(acc)


def segment_sum(indices, values, counts, sums, deterministic) -> None:
    # Counts are exact in fp32 up to 2^24 rows per code; the sums go through fp64.
    ones = torch.ones(indices.shape[0], dtype=torch.float32, device=indices.device)
    with _deterministic(sums.device, deterministic):
        counts.index_add_(0, indices, ones)
    add_per_code(sums, indices, values, deterministic)


def tiles(device: torch.device, z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> dict:
    """How a search of such inputs is cut (see ``vqkern.backends``): on CPU the fused
    kernel's row blocks, code panels and thread splits (from vqkern._cpu) or the tiled
    path's tiles; elsewhere the (rows x K) blocks, which small shapes never cross."""
    if torch.device(device).type != "cpu":
        return dict(path="blocked PyTorch")
    ext, isa, _ = _active_cpu_ext()
    if ext is None:
        rows, codes, _ = _cpu_tile()
        return dict(path="tiled PyTorch", rows=rows, codes=codes)  # the backward: index_add_, untiled
    bf16 = isa in BF16_ISAS and z_dtype == codebook_dtype == torch.bfloat16
    row_block, panel, min_split = ext.search_tiles(isa, bf16)
    threads = torch.get_num_threads()
    # The kernel splits the codes when there are fewer row blocks than threads.
    return dict(path=f"vqkern._cpu {isa}{' bf16' if bf16 else ''}", rows=row_block, codes=panel,
                split_rows=row_block * (threads - 1), split_codes=min_split, backward_rows=row_block)


# LFQ's entropy terms (vqkern.lfq_entropy): tiled PyTorch, or vqkern._cpu on CPU.
from .lfq_torch import lfq_entropy, lfq_entropy_backward  # noqa: E402,F401
