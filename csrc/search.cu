// Fused nearest-code search: distance tiles reduced to a running (min, argmin)
// in registers, never writing the N x K score matrix.
//
// score(i, k) = |e_k|^2 - 2 z_i . e_k  (|z_i|^2 is constant per row, so it does not
// change the argmin). The chosen code's distance is recomputed exactly from the
// residual by the epilogue (elementwise.cu), as the op contract requires.
//
// Frame. The fp32 scores round at the scale of |z|^2 + |e|^2, so data far from the origin
// loses its ranking in the rounding (50 standard deviations out, N = 4000, K = 1024,
// D = 128: a farther code on 48 rows, up to 0.21% farther). The fp32 FMA kernel ranks in
// a frame centred on the data: z - c and e - c for a per-call centre c (the mean of
// sampled finite rows, computed by the caller: vqkern/backends/_frame.py), so the rounding
// scales with the distance of the rows and their nearest codes from c. The tensor-core
// kernel multiplies the fp16/bf16 inputs as they are, in the origin's frame (bound
// relative to |z|^2 + |e|^2): rounding z - c and e - c back to 16 bits loses 2^-9 (bf16)
// or 2^-12 (fp16) of the spread. Emulated on CPU (benchmarks/half_frame.py) bf16 lost
// nothing in the origin's frame out to 500 standard deviations, fp16 chose a farther code
// on 1% of rows at 50; an exact centring (hi/lo split, three products) lost nothing for
// either, at three times the MMA work: to be timed on a GPU (docs/precision.md).
#include <mma.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "vqkern.h"

namespace vqkern {
namespace {

constexpr int kRows = kSearchRows;  // rows of z per block
constexpr int kCodes = 64;          // codes per tile
constexpr int kThreads = 256;       // 16 x 16 threads, each owning 4 rows x 4 codes
// The tile loaders index rows of z and codes of the codebook with the same counter.
static_assert(kRows == kCodes, "search tiles are square");

// |e_k - c|^2 in fp32 (c null: |e_k|^2), once per call: one warp per code.
__global__ void code_norms_kernel(const void* __restrict__ codebook, int cb_dtype, int64_t k, int64_t d,
                                  const float* __restrict__ centre, float* __restrict__ norms) {
  const int lane = threadIdx.x & 31;
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (code >= k) return;
  float acc = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float v = load_as_float(codebook, cb_dtype, code * d + j) - (centre != nullptr ? centre[j] : 0.f);
    acc = fmaf(v, v, acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) norms[code] = acc;
}

// Each thread keeps the best (score, index) of its 4 rows over the codes it saw;
// the 16 threads sharing those rows (one half-warp) then agree on the winner.
struct RowBest {
  float score[4];
  int index[4];
  __device__ void init() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      score[i] = __int_as_float(0x7f800000);
      index[i] = INT_MAX;
    }
  }
  __device__ void offer(int i, float s, int code) {
    if (better(s, code, score[i], index[i])) {
      score[i] = s;
      index[i] = code;
    }
  }
  // Reduce over the 16 lanes with the same ty (lanes differ in the low 4 bits).
  __device__ void reduce_half_warp() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const float s = __shfl_xor_sync(0xffffffffu, score[i], off);
        const int c = __shfl_xor_sync(0xffffffffu, index[i], off);
        if (better(s, c, score[i], index[i])) {
          score[i] = s;
          index[i] = c;
        }
      }
    }
  }
  __device__ void store(int64_t n, int64_t row0, int ty, int tx, int split, float* part_scores, int32_t* part_index) {
    if (tx != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + ty + 16 * i;
      if (row < n) {
        part_scores[split * n + row] = score[i];
        part_index[split * n + row] = index[i];
      }
    }
  }
};

// The code range of one split: whole tiles, so splits never share a tile.
__device__ __forceinline__ void split_range(int64_t k, int tiles_per_split, int64_t* lo, int64_t* hi) {
  *lo = static_cast<int64_t>(blockIdx.y) * tiles_per_split * kCodes;
  const int64_t end = *lo + static_cast<int64_t>(tiles_per_split) * kCodes;
  *hi = end < k ? end : k;
}

// fp32 path: plain FMA in fp32, for fp32 inputs and for mixed dtypes (the narrower
// operand is widened to fp32 on load, so bf16 z with an fp32 codebook is exact), in the
// frame centred on `centre` (d,): z and the codes minus the centre, formed on load.
constexpr int kDepthF32 = 16;

__global__ void __launch_bounds__(kThreads)
    search_fma_kernel(const void* __restrict__ z, int z_dtype, const void* __restrict__ codebook, int cb_dtype,
                      int64_t n, int64_t k, int64_t d, const float* __restrict__ centre,
                      const float* __restrict__ norms, int tiles_per_split, float* __restrict__ part_scores,
                      int32_t* __restrict__ part_index) {
  // Transposed tiles ([depth][row]) so the inner loop reads 16 consecutive codes per
  // half-warp; the +1 column spreads the loader's stores (consecutive depths) over banks.
  __shared__ float zs[kDepthF32][kRows + 1];
  __shared__ float es[kDepthF32][kCodes + 1];
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  int64_t lo, hi;
  split_range(k, tiles_per_split, &lo, &hi);

  RowBest best;
  best.init();
  for (int64_t code0 = lo; code0 < hi; code0 += kCodes) {
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < d; k0 += kDepthF32) {
#pragma unroll
      for (int l = 0; l < (kRows * kDepthF32) / kThreads; ++l) {
        const int e = tid + l * kThreads, r = e / kDepthF32, kk = e % kDepthF32;
        const int64_t row = row0 + r, col = k0 + kk, code = code0 + r;
        const float c = col < d ? centre[col] : 0.f;
        zs[kk][r] = (row < n && col < d) ? load_as_float(z, z_dtype, row * d + col) - c : 0.f;
        es[kk][r] = (code < hi && col < d) ? load_as_float(codebook, cb_dtype, code * d + col) - c : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kDepthF32; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = zs[kk][ty + 16 * i];
          b[i] = es[kk][tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t code = code0 + tx + 16 * j;
      if (code >= hi) continue;
      const float norm = norms[code];
#pragma unroll
      for (int i = 0; i < 4; ++i) best.offer(i, fmaf(-2.f, acc[i][j], norm), static_cast<int>(code));
    }
  }
  best.reduce_half_warp();
  best.store(n, row0, ty, tx, blockIdx.y, part_scores, part_index);
}

// Tensor-core path for fp16/bf16 z and codebook of the same dtype: WMMA 16x16x16
// with fp32 accumulation (products of 16-bit values are exact in fp32, so only the
// accumulation order differs from an fp32 GEMM).
constexpr int kDepthMma = 32;
constexpr int kPadMma = 8;     // keeps ldm a multiple of 8 elements and staggers banks
constexpr int kLdScores = 80;  // 80 floats: rows ty and ty+1 land on disjoint bank halves

template <typename T>
__global__ void __launch_bounds__(kThreads)
    search_mma_kernel(const T* __restrict__ z, const T* __restrict__ codebook, int64_t n, int64_t k, int64_t d,
                      const float* __restrict__ norms, int tiles_per_split, bool vec16, float* __restrict__ part_scores,
                      int32_t* __restrict__ part_index) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host only selects this kernel there
#else
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T zs[kRows][kDepthMma + kPadMma];
  __shared__ __align__(32) T es[kCodes][kDepthMma + kPadMma];
  __shared__ __align__(32) float scores[kRows][kLdScores];
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, warp = tid >> 5;
  const int wr = warp >> 1, wc = (warp & 1) * 2;  // 4 x 2 warps, each 16 rows x 32 codes
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  int64_t lo, hi;
  split_range(k, tiles_per_split, &lo, &hi);
  const T zero = T(0.f);

  RowBest best;
  best.init();
  for (int64_t code0 = lo; code0 < hi; code0 += kCodes) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t k0 = 0; k0 < d; k0 += kDepthMma) {
      if (vec16) {
        // One 16-byte load per thread per operand: d % 8 == 0 makes a chunk of 8
        // either wholly inside the row or wholly past its end; zero bits are 0.0.
        static_assert(kRows * kDepthMma == kThreads * 8, "one 8-element chunk per thread");
        const int r = tid / (kDepthMma / 8), kk = (tid % (kDepthMma / 8)) * 8;
        const int64_t row = row0 + r, col = k0 + kk, code = code0 + r;
        uint4 zv = make_uint4(0, 0, 0, 0), ev = make_uint4(0, 0, 0, 0);
        if (row < n && col < d) zv = *reinterpret_cast<const uint4*>(z + row * d + col);
        if (code < hi && col < d) ev = *reinterpret_cast<const uint4*>(codebook + code * d + col);
        *reinterpret_cast<uint4*>(&zs[r][kk]) = zv;
        *reinterpret_cast<uint4*>(&es[r][kk]) = ev;
      } else {
#pragma unroll
        for (int l = 0; l < (kRows * kDepthMma) / kThreads; ++l) {
          const int e = tid + l * kThreads, r = e / kDepthMma, kk = e % kDepthMma;
          const int64_t row = row0 + r, col = k0 + kk, code = code0 + r;
          zs[r][kk] = (row < n && col < d) ? z[row * d + col] : zero;
          es[r][kk] = (code < hi && col < d) ? codebook[code * d + col] : zero;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kDepthMma; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, &zs[wr * 16][kk], kDepthMma + kPadMma);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // es holds codes as rows, i.e. the (depth x codes) operand in column-major order.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, &es[(wc + f) * 16][kk], kDepthMma + kPadMma);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();
    }
    wmma::store_matrix_sync(&scores[wr * 16][wc * 16], acc[0], kLdScores, wmma::mem_row_major);
    wmma::store_matrix_sync(&scores[wr * 16][(wc + 1) * 16], acc[1], kLdScores, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t code = code0 + tx + 16 * j;
      if (code >= hi) continue;
      const float norm = norms[code];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        best.offer(i, fmaf(-2.f, scores[ty + 16 * i][tx + 16 * j], norm), static_cast<int>(code));
    }
    // The next tile's first __syncthreads (after its loads) orders these reads before
    // the next store_matrix_sync.
  }
  best.reduce_half_warp();
  best.store(n, row0, ty, tx, blockIdx.y, part_scores, part_index);
#endif
}

}  // namespace

void launch_search_epilogue(const void* z, int z_dtype, const void* codebook, int cb_dtype, int64_t n, int64_t k,
                            int64_t d, const float* part_scores, const int32_t* part_index, int splits,
                            int64_t* indices, float* distances, void* quantized, cudaStream_t stream);

std::string probe() {
  // cudaFuncGetAttributes fails when the binary holds no image (SASS or PTX) that
  // this device can run, so availability can say so before any launch.
  cudaFuncAttributes fma{}, mma_half{}, mma_bf16{};
  VQ_CUDA_CHECK(cudaFuncGetAttributes(&fma, search_fma_kernel));
  VQ_CUDA_CHECK(cudaFuncGetAttributes(&mma_half, search_mma_kernel<__half>));
  VQ_CUDA_CHECK(cudaFuncGetAttributes(&mma_bf16, search_mma_kernel<__nv_bfloat16>));
  return "search kernels: binary sm_" + std::to_string(fma.binaryVersion) + ", ptx " + std::to_string(fma.ptxVersion) +
         ", registers fma/mma " + std::to_string(fma.numRegs) + "/" + std::to_string(mma_half.numRegs);
}

void search(const void* z, int z_dtype, const void* codebook, int cb_dtype, int64_t n, int64_t k, int64_t d,
            const float* centre, float* norms, float* part_scores, int32_t* part_index, int splits,
            bool use_tensor_cores, int64_t* indices, float* distances, void* quantized, cudaStream_t stream) {
  check_dtype(z_dtype, "z");
  check_dtype(cb_dtype, "codebook");
  if (n < 0 || k < 1 || d < 1) throw std::invalid_argument("vqkern._C.search: need n >= 0, k >= 1, d >= 1");
  if (k > INT_MAX) throw std::invalid_argument("vqkern._C.search: k must fit in int32");
  if (splits < 1) throw std::invalid_argument("vqkern._C.search: splits must be >= 1");
  if (n == 0) return;
  const bool mma = use_tensor_cores && z_dtype == cb_dtype && z_dtype != kFloat32;
  if (!mma && centre == nullptr)
    throw std::invalid_argument("vqkern._C.search: the fp32 kernel needs the centre (d,) of the codebook");

  code_norms_kernel<<<ceil_div_int(k * 32, 256), 256, 0, stream>>>(codebook, cb_dtype, k, d, mma ? nullptr : centre,
                                                                   norms);
  VQ_LAUNCH_CHECK("code_norms_kernel");

  // Whole tiles per split; the effective split count may come out below `splits`
  // (the workspace the caller sized for `splits` is then larger than needed).
  const int64_t tiles = (k + kCodes - 1) / kCodes;
  const int64_t max_splits = tiles < 65535 ? tiles : 65535;
  const int64_t want = splits < max_splits ? splits : max_splits;
  const int tiles_per_split = static_cast<int>((tiles + want - 1) / want);
  const int eff_splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
  const dim3 grid(ceil_div_int(n, kRows), eff_splits);

  // 16-byte loads need 16-byte aligned rows: d a multiple of 8 (2-byte elements)
  // and aligned bases (torch's allocations are; a sliced view may not be).
  const bool vec16 = d % 8 == 0 && reinterpret_cast<std::uintptr_t>(z) % 16 == 0 &&
                     reinterpret_cast<std::uintptr_t>(codebook) % 16 == 0;
  if (mma && z_dtype == kFloat16) {
    search_mma_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(z),
                                                             static_cast<const __half*>(codebook), n, k, d, norms,
                                                             tiles_per_split, vec16, part_scores, part_index);
    VQ_LAUNCH_CHECK("search_mma_kernel<half>");
  } else if (mma) {
    search_mma_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(z), static_cast<const __nv_bfloat16*>(codebook), n, k, d, norms,
        tiles_per_split, vec16, part_scores, part_index);
    VQ_LAUNCH_CHECK("search_mma_kernel<bfloat16>");
  } else {
    search_fma_kernel<<<grid, kThreads, 0, stream>>>(z, z_dtype, codebook, cb_dtype, n, k, d, centre, norms,
                                                     tiles_per_split, part_scores, part_index);
    VQ_LAUNCH_CHECK("search_fma_kernel");
  }
  launch_search_epilogue(z, z_dtype, codebook, cb_dtype, n, k, d, part_scores, part_index, eff_splits, indices,
                         distances, quantized, stream);
}

}  // namespace vqkern
