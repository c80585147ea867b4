// Segment sum behind the codebook gradient, the EMA statistics and the usage
// histogram: counts[k] += #{i: idx_i = k}, sums[k] += sum_{idx_i = k} values_i (fp32).
#include <stdexcept>

#include "common.cuh"
#include "vqkern.h"

namespace vqkern {
namespace {

constexpr int kChunk = kSegmentChunkRows;
constexpr int kChunkThreads = 128;
constexpr int kMaxTileWarps = 8;

// Atomic path: one block per tile of kTileRows consecutive rows. The tile's rows are
// sorted by code (stably, by rank, in shared memory); each thread then owns a column and
// walks the sorted rows, summing each run of one code in pieces (PieceSum) and adding the
// run's total with one atomic. A code's sum is thus a sum of per-tile partial sums whose
// low-order bits no longer agree, instead of a running sum over every row (which errs
// like the rows when they round alike). One warp per 32 columns (at most 8): the grid is
// (tiles, column groups of 8 warps).
//
// With base (the codebook gradient), each row adds base[code] - value, formed once in
// fp32, and with grad_out also writes grad_out = grad_q - *scale * (base[code] - value)
// in the value's dtype: the straight-through backward's one pass.
__global__ void __launch_bounds__(kMaxTileWarps * 32)
    segment_tile_kernel(const int64_t* __restrict__ indices, const void* __restrict__ values, int v_dtype,
                        const void* __restrict__ base, int base_dtype, const void* __restrict__ grad_q, int g_dtype,
                        const float* __restrict__ scale_ptr, void* __restrict__ grad_out, int64_t n, int64_t d,
                        float* __restrict__ counts, float* __restrict__ sums) {
  __shared__ int64_t code[kTileRows];
  __shared__ int order[kTileRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int rows = static_cast<int>(n - row0 < kTileRows ? n - row0 : kTileRows);
  const int tid = threadIdx.y * 32 + threadIdx.x, threads = blockDim.x * blockDim.y;
  for (int r = tid; r < rows; r += threads) code[r] = indices[row0 + r];
  __syncthreads();
  // Stable rank sort: a row's position is the number of rows before it in (code, row) order.
  for (int r = tid; r < rows; r += threads) {
    int pos = 0;
    for (int j = 0; j < rows; ++j) pos += code[j] < code[r] || (code[j] == code[r] && j < r);
    order[pos] = r;
  }
  __syncthreads();
  const float scale = grad_out != nullptr ? *scale_ptr : 0.f;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y) * 32 + threadIdx.x;
  if (col >= d) return;
  PieceSum run;
  int run_rows = 0;
  for (int p = 0; p < rows; ++p) {
    const int r = order[p];
    const int64_t c = code[r], at = (row0 + r) * d + col;
    float v = load_as_float(values, v_dtype, at);
    if (base != nullptr) {
      v = load_as_float(base, base_dtype, c * d + col) - v;
      if (grad_out != nullptr) store_from_float(grad_out, v_dtype, at, load_as_float(grad_q, g_dtype, at) - scale * v);
    }
    run.add(v);
    ++run_rows;
    if (p + 1 < rows && code[order[p + 1]] == c) continue;
    atomicAdd(sums + c * d + col, run.value());
    if (counts != nullptr && col == 0) atomicAdd(counts + c, static_cast<float>(run_rows));
    run = PieceSum{};
    run_rows = 0;
  }
}

// Pass 1: one block per chunk of sorted rows, walking it in order (each run summed in
// pieces, PieceSum). A run of one
// code that lies wholly inside the chunk (its code appears in no other chunk) is
// added to sums directly: this block is the code's only writer. A run that
// continues into a neighbouring chunk is parked in partial: slot 0 for the
// chunk's first run, slot 1 for its last, and summed in chunk order by pass 2.
// With base, each row adds base[code] - value (the residual), formed in fp32.
__global__ void __launch_bounds__(kChunkThreads)
    segment_chunk_kernel(const int64_t* __restrict__ sorted_idx, const int64_t* __restrict__ perm,
                         const void* __restrict__ values, int v_dtype, const void* __restrict__ base, int base_dtype,
                         int64_t n, int64_t d, float* __restrict__ counts, float* __restrict__ sums,
                         float* __restrict__ partial) {
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const int64_t before = begin > 0 ? sorted_idx[begin - 1] : -1;
  const int64_t after = end < n ? sorted_idx[end] : -1;
  // Column slices outermost: one fp32 accumulator per thread, rows walked in order.
  for (int64_t col0 = 0; col0 < d; col0 += kChunkThreads) {
    const int64_t col = col0 + threadIdx.x;
    const bool active = col < d;
    int64_t run_start = begin;
    PieceSum acc;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t code = sorted_idx[p];
      if (active) {
        const float v = load_as_float(values, v_dtype, perm[p] * d + col);
        acc.add(base != nullptr ? load_as_float(base, base_dtype, code * d + col) - v : v);
      }
      if (p + 1 < end && sorted_idx[p + 1] == code) continue;
      // The run [run_start, p] of `code` ends here.
      const bool first = run_start == begin, last = p + 1 == end;
      const bool spans = (first && code == before) || (last && code == after);
      if (!spans) {
        if (active) sums[code * d + col] += acc.value();
        if (counts != nullptr && col0 == 0 && threadIdx.x == 0) counts[code] += static_cast<float>(p + 1 - run_start);
      } else if (active) {
        partial[(2 * chunk + (first ? 0 : 1)) * d + col] = acc.value();
      }
      acc = PieceSum{};
      run_start = p + 1;
    }
  }
}

// First position in [lo, hi) whose code is >= key.
__device__ int64_t lower_bound(const int64_t* __restrict__ a, int64_t lo, int64_t hi, int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (a[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Pass 2: only the codes whose rows span a chunk boundary. Boundary b (between
// chunks b - 1 and b) is owned by its code when that code spans it but not the
// boundary before (so each spanning code has exactly one owner, its first
// boundary); the owner adds the code's pieces in chunk order. At most
// ceil(n / kChunk) - 1 boundaries, however large k is: a grid over the boundaries,
// not over all k codes with two binary searches each.
__global__ void __launch_bounds__(kChunkThreads)
    segment_span_kernel(const int64_t* __restrict__ sorted_idx, int64_t n, int64_t d, int64_t chunks,
                        float* __restrict__ counts, float* __restrict__ sums, const float* __restrict__ partial) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) + 1; b < chunks; b += gridDim.x) {
    const int64_t at = b * kChunk;
    const int64_t code = sorted_idx[at];
    if (sorted_idx[at - 1] != code) continue;                    // no run spans b
    if (b > 1 && sorted_idx[at - kChunk - 1] == code) continue;  // spans b - 1 too: not the owner
    // The code starts in chunk b - 1 and ends in the last chunk c1 whose first row is it.
    const int64_t c0 = b - 1;
    int64_t c1 = b;
    while (c1 + 1 < chunks && sorted_idx[(c1 + 1) * kChunk] == code) ++c1;
    for (int64_t col = threadIdx.x; col < d; col += kChunkThreads) {
      // Chunk c0 holds the code's run as its last piece (slot 1) unless the run is
      // also the chunk's first (it starts at the chunk's first row): slot 0.
      PieceSum acc;
      acc.add(partial[(2 * c0 + (sorted_idx[c0 * kChunk] == code ? 0 : 1)) * d + col]);
      for (int64_t c = c0 + 1; c <= c1; ++c) acc.add(partial[2 * c * d + col]);  // first run: slot 0
      sums[code * d + col] += acc.value();
    }
    if (counts != nullptr && threadIdx.x == 0) {
      const int64_t lo = lower_bound(sorted_idx, c0 * kChunk, at, code);
      const int64_t end = (c1 + 1) * kChunk < n ? (c1 + 1) * kChunk : n;
      const int64_t hi = lower_bound(sorted_idx, c1 * kChunk, end, code + 1);
      counts[code] += static_cast<float>(hi - lo);
    }
  }
}

}  // namespace

void launch_segment_tiles(const int64_t* indices, const void* values, int v_dtype, const void* base, int base_dtype,
                          const void* grad_q, int g_dtype, const float* scale, void* grad_out, int64_t n, int64_t d,
                          float* counts, float* sums, cudaStream_t stream) {
  const int64_t warps = (d + 31) / 32;
  const int per_block = static_cast<int>(warps < kMaxTileWarps ? warps : kMaxTileWarps);
  const dim3 grid(ceil_div_int(n, kTileRows), ceil_div_int(warps, per_block));
  if (grid.y > 65535) throw std::invalid_argument("vqkern._C: d is too large for the segment sum (d <= 16.7M)");
  segment_tile_kernel<<<grid, dim3(32, per_block), 0, stream>>>(indices, values, v_dtype, base, base_dtype, grad_q,
                                                                g_dtype, scale, grad_out, n, d, counts, sums);
  VQ_LAUNCH_CHECK("segment_tile_kernel");
}

void segment_sum_atomic(const int64_t* indices, const void* values, int v_dtype, int64_t n, int64_t d, float* counts,
                        float* sums, cudaStream_t stream) {
  check_dtype(v_dtype, "values");
  if (n < 0 || d < 1) throw std::invalid_argument("vqkern._C.segment_sum: need n >= 0, d >= 1");
  if (n == 0) return;
  launch_segment_tiles(indices, values, v_dtype, nullptr, 0, nullptr, 0, nullptr, nullptr, n, d, counts, sums, stream);
}

void segment_sum_sorted(const int64_t* sorted_idx, const int64_t* perm, const void* values, int v_dtype,
                        const void* base, int base_dtype, int64_t n, int64_t d, int64_t k, float* counts, float* sums,
                        float* partial, cudaStream_t stream) {
  check_dtype(v_dtype, "values");
  if (base != nullptr) check_dtype(base_dtype, "base");
  if (n < 0 || d < 1 || k < 1) throw std::invalid_argument("vqkern._C.segment_sum_sorted: need n >= 0, d >= 1, k >= 1");
  if (n == 0) return;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  segment_chunk_kernel<<<static_cast<unsigned>(chunks), kChunkThreads, 0, stream>>>(
      sorted_idx, perm, values, v_dtype, base, base_dtype, n, d, counts, sums, partial);
  VQ_LAUNCH_CHECK("segment_chunk_kernel");
  if (chunks < 2) return;
  const int64_t span_blocks = chunks - 1 < 65535 ? chunks - 1 : 65535;
  segment_span_kernel<<<static_cast<unsigned>(span_blocks), kChunkThreads, 0, stream>>>(sorted_idx, n, d, chunks,
                                                                                        counts, sums, partial);
  VQ_LAUNCH_CHECK("segment_span_kernel");
}

}  // namespace vqkern
