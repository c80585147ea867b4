// Row-wise kernels that move a few bytes per element: the search epilogue
// (split reduction + gather + exact residual distance) and the fused backward.
// One warp per row, lanes striding over D.
#include <climits>
#include <stdexcept>

#include "common.cuh"
#include "vqkern.h"

namespace vqkern {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    search_epilogue_kernel(const void* __restrict__ z, int z_dtype, const void* __restrict__ codebook, int cb_dtype,
                           int64_t n, int64_t k, int64_t d, const float* __restrict__ part_scores,
                           const int32_t* __restrict__ part_index, int splits, int64_t* __restrict__ indices,
                           float* __restrict__ distances, void* __restrict__ quantized) {
  const int lane = threadIdx.x & 31;
  const int64_t row = warp_row();
  if (row >= n) return;
  // Splits cover increasing code ranges; better() keeps the lowest index on ties.
  float best = part_scores[row];
  int code = part_index[row];
  for (int s = 1; s < splits; ++s) {
    const float sc = part_scores[s * n + row];
    const int c = part_index[s * n + row];
    if (better(sc, c, best, code)) {
      best = sc;
      code = c;
    }
  }
  // No code won only when every score was NaN or +inf; argmin's answer for
  // all-equal scores is the first code.
  if (code < 0 || code >= k) code = 0;
  float acc = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float e = load_as_float(codebook, cb_dtype, code * d + j);
    const float diff = load_as_float(z, z_dtype, row * d + j) - e;
    acc = fmaf(diff, diff, acc);
    store_from_float(quantized, z_dtype, row * d + j, e);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    indices[row] = code;
    distances[row] = acc;
  }
}

// The straight-through gradient of z alone (the deterministic mode takes the residual
// sums from the sorted segment sum): grad_z = grad_q - scale * (e - z), the difference
// formed once per element in fp32. With the sums too, the tiled segment-sum kernel runs
// the same pass (segment_sum.cu). scale is read on the device: no wait on the host.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    backward_kernel(const void* __restrict__ grad_q, int g_dtype, const void* __restrict__ z, int z_dtype,
                    const void* __restrict__ codebook, int cb_dtype, const int64_t* __restrict__ indices, int64_t n,
                    int64_t d, const float* __restrict__ scale_ptr, void* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = warp_row();
  if (row >= n) return;
  const int64_t code = indices[row];
  const float scale = *scale_ptr;
  for (int64_t j = lane; j < d; j += 32) {
    const int64_t at = row * d + j;
    const float diff = load_as_float(codebook, cb_dtype, code * d + j) - load_as_float(z, z_dtype, at);
    store_from_float(out, z_dtype, at, load_as_float(grad_q, g_dtype, at) - scale * diff);
  }
}

int warp_blocks(int64_t n) { return ceil_div_int(n, kWarpsPerBlock); }

}  // namespace

void launch_segment_tiles(const int64_t* indices, const void* values, int v_dtype, const void* base, int base_dtype,
                          const void* grad_q, int g_dtype, const float* scale, void* grad_out, int64_t n, int64_t d,
                          float* counts, float* sums, cudaStream_t stream);

void launch_search_epilogue(const void* z, int z_dtype, const void* codebook, int cb_dtype, int64_t n, int64_t k,
                            int64_t d, const float* part_scores, const int32_t* part_index, int splits,
                            int64_t* indices, float* distances, void* quantized, cudaStream_t stream) {
  search_epilogue_kernel<<<warp_blocks(n), kWarpsPerBlock * 32, 0, stream>>>(
      z, z_dtype, codebook, cb_dtype, n, k, d, part_scores, part_index, splits, indices, distances, quantized);
  VQ_LAUNCH_CHECK("search_epilogue_kernel");
}

void backward(const void* grad_q, int g_dtype, const void* z, int z_dtype, const void* codebook, int cb_dtype,
              const int64_t* indices, int64_t n, int64_t d, const float* scale, void* grad_z, float* diff_sums,
              cudaStream_t stream) {
  check_dtype(z_dtype, "z");
  check_dtype(cb_dtype, "codebook");
  if (grad_z != nullptr) check_dtype(g_dtype, "grad_quantized");
  if (n < 0 || d < 1) throw std::invalid_argument("vqkern._C.backward: need n >= 0, d >= 1");
  if (grad_z != nullptr && scale == nullptr)
    throw std::invalid_argument("vqkern._C.backward: grad_z needs the scale pointer");
  if (n == 0 || (grad_z == nullptr && diff_sums == nullptr)) return;
  if (diff_sums != nullptr) {
    launch_segment_tiles(indices, z, z_dtype, codebook, cb_dtype, grad_q, g_dtype, scale, grad_z, n, d, nullptr,
                         diff_sums, stream);
    return;
  }
  backward_kernel<<<warp_blocks(n), kWarpsPerBlock * 32, 0, stream>>>(grad_q, g_dtype, z, z_dtype, codebook, cb_dtype,
                                                                      indices, n, d, scale, grad_z);
  VQ_LAUNCH_CHECK("backward_kernel");
}

}  // namespace vqkern
