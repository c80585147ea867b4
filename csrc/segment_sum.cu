// Segment sum behind the codebook gradient, the EMA statistics and the usage
// histogram: counts[k] += #{i: idx_i = k}, sums[k] += sum_{idx_i = k} values_i (fp32).
#include <stdexcept>

#include "common.cuh"
#include "vqkern.h"

namespace vqkern {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = kSegmentChunkRows;
constexpr int kChunkThreads = 128;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
segment_atomic_kernel(const int64_t* __restrict__ indices, const void* __restrict__ values,
                      int v_dtype, int64_t n, int64_t d, float* __restrict__ counts,
                      float* __restrict__ sums) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  const int64_t code = indices[row];
  if (lane == 0) atomicAdd(counts + code, 1.f);
  for (int64_t j = lane; j < d; j += 32)
    atomicAdd(sums + code * d + j, load_as_float(values, v_dtype, row * d + j));
}

// Pass 1: one block per chunk of sorted rows, walking it in order. A run of one
// code that lies wholly inside the chunk (its code appears in no other chunk) is
// added to sums directly: this block is the code's only writer. A run that
// continues into a neighbouring chunk is parked in partial: slot 0 for the
// chunk's first run, slot 1 for its last, and summed in chunk order by pass 2.
__global__ void __launch_bounds__(kChunkThreads)
segment_chunk_kernel(const int64_t* __restrict__ sorted_idx, const int64_t* __restrict__ perm,
                     const void* __restrict__ values, int v_dtype, int64_t n, int64_t d,
                     float* __restrict__ counts, float* __restrict__ sums,
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
    float acc = 0.f;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t code = sorted_idx[p];
      if (active) acc += load_as_float(values, v_dtype, perm[p] * d + col);
      if (p + 1 < end && sorted_idx[p + 1] == code) continue;
      // The run [run_start, p] of `code` ends here.
      const bool first = run_start == begin, last = p + 1 == end;
      const bool spans = (first && code == before) || (last && code == after);
      if (!spans) {
        if (active) sums[code * d + col] += acc;
        if (col0 == 0 && threadIdx.x == 0) counts[code] += static_cast<float>(p + 1 - run_start);
      } else if (active) {
        partial[(2 * chunk + (first ? 0 : 1)) * d + col] = acc;
      }
      acc = 0.f;
      run_start = p + 1;
    }
  }
}

__device__ int64_t lower_bound(const int64_t* __restrict__ a, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Pass 2: codes whose rows span several chunks, their pieces summed in chunk order.
__global__ void __launch_bounds__(kChunkThreads)
segment_span_kernel(const int64_t* __restrict__ sorted_idx, int64_t n, int64_t d, int64_t k,
                    float* __restrict__ counts, float* __restrict__ sums,
                    const float* __restrict__ partial) {
  for (int64_t code = blockIdx.x; code < k; code += gridDim.x) {
    const int64_t lo = lower_bound(sorted_idx, n, code);
    const int64_t hi = lower_bound(sorted_idx, n, code + 1);
    if (hi - lo == 0) continue;
    const int64_t c0 = lo / kChunk, c1 = (hi - 1) / kChunk;
    if (c0 == c1) continue;  // pass 1 wrote it
    for (int64_t col = threadIdx.x; col < d; col += kChunkThreads) {
      float acc = 0.f;
      for (int64_t c = c0; c <= c1; ++c) {
        // In chunk c the code's run is the chunk's first run iff it started at or before it.
        const int slot = lo <= c * kChunk ? 0 : 1;
        acc += partial[(2 * c + slot) * d + col];
      }
      sums[code * d + col] += acc;
    }
    if (threadIdx.x == 0) counts[code] += static_cast<float>(hi - lo);
  }
}

}  // namespace

void segment_sum_atomic(const int64_t* indices, const void* values, int v_dtype, int64_t n,
                        int64_t d, float* counts, float* sums, cudaStream_t stream) {
  check_dtype(v_dtype, "values");
  if (n < 0 || d < 1) throw std::invalid_argument("vqkern._C.segment_sum: need n >= 0, d >= 1");
  if (n == 0) return;
  segment_atomic_kernel<<<ceil_div_int(n, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
      indices, values, v_dtype, n, d, counts, sums);
  VQ_LAUNCH_CHECK("segment_atomic_kernel");
}

void segment_sum_sorted(const int64_t* sorted_idx, const int64_t* perm, const void* values,
                        int v_dtype, int64_t n, int64_t d, int64_t k, float* counts, float* sums,
                        float* partial, cudaStream_t stream) {
  check_dtype(v_dtype, "values");
  if (n < 0 || d < 1 || k < 1)
    throw std::invalid_argument("vqkern._C.segment_sum_sorted: need n >= 0, d >= 1, k >= 1");
  if (n == 0) return;
  segment_chunk_kernel<<<ceil_div_int(n, kChunk), kChunkThreads, 0, stream>>>(
      sorted_idx, perm, values, v_dtype, n, d, counts, sums, partial);
  VQ_LAUNCH_CHECK("segment_chunk_kernel");
  const int64_t span_blocks = k < 65536 ? k : 65536;
  segment_span_kernel<<<static_cast<unsigned>(span_blocks), kChunkThreads, 0, stream>>>(
      sorted_idx, n, d, k, counts, sums, partial);
  VQ_LAUNCH_CHECK("segment_span_kernel");
}

}  // namespace vqkern
