// One-pass backward of quantize on the CPU (fp32, or bf16 in and out with fp32
// arithmetic and fp32 sums): for each row the difference
// z - e is formed once, giving the straight-through + commitment gradient of z and
// the residual sum of its code, in one read of gq, z and the code row and one
// write of grad_z.
//
// Residual sums, not count * e - sum z: the latter cancels catastrophically when z
// sits near its code (the difference of two nearly equal sums) or far from the
// origin (a common offset of 100 leaves ~5 significant bits of a 0.01 residual).
//
// Determinism. A first pass over the indices counts the rows of each code (and
// checks every index before anything is written); the codes are then cut into one
// contiguous range per thread holding about n / threads rows, and each thread walks
// all rows in order, taking those whose code is in its range. Every code's sum is
// therefore added in row order by one thread: bitwise the sequential result for any
// thread count, with O(k) extra memory and no per-thread (k, d) partials to zero and
// reduce (which would double the traffic at k * d = n * d, e.g. 16384 x 16384 x 256).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "search.h"
#include "search_kernels.h"

namespace vqkern_cpu {
namespace {

// fp32 to the output type: fp32 itself, or bf16 rounded to nearest even (NaN kept a
// quiet NaN), as torch's fp32 -> bf16 conversion rounds.
inline void store_as(float* out, float v) { *out = v; }
inline void store_as(uint16_t* out, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = nan ? static_cast<uint16_t>((bits >> 16) | 0x40u) : static_cast<uint16_t>(bits >> 16);
}

// The per-row updates, in fp32 whatever T is, auto-vectorized at AVX2 width
// (memory-bound: wider vectors would not move more bytes). ds -= diff is exactly
// ds += (e - z).
template <typename T>
__attribute__((target("avx2,fma"))) void row_both(const T* __restrict g, const T* __restrict z,
                                                  const T* __restrict e, float scale, T* __restrict gz,
                                                  float* __restrict ds, int64_t d) {
  for (int64_t t = 0; t < d; ++t) {
    const float diff = to_f32(z[t]) - to_f32(e[t]);
    store_as(gz + t, to_f32(g[t]) + scale * diff);
    ds[t] -= diff;
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void row_grad(const T* __restrict g, const T* __restrict z,
                                                  const T* __restrict e, float scale, T* __restrict gz,
                                                  int64_t d) {
  for (int64_t t = 0; t < d; ++t) store_as(gz + t, to_f32(g[t]) + scale * (to_f32(z[t]) - to_f32(e[t])));
}

template <typename T>
__attribute__((target("avx2,fma"))) void row_sums(const T* __restrict z, const T* __restrict e,
                                                  float* __restrict ds, int64_t d) {
  for (int64_t t = 0; t < d; ++t) ds[t] += to_f32(e[t]) - to_f32(z[t]);
}


template <typename T>
void backward_rows(const T* gq, const T* z, const T* codebook, const int64_t* idx, int64_t n, int64_t d, int64_t k,
                   float scale, T* grad_z, float* diff_sums, int threads) {
  if (n <= 0 || (!grad_z && !diff_sums)) return;
  if (k < 1 || d < 1) throw std::invalid_argument("vqkern._cpu.backward_l2: k and d must be >= 1");
  if (!supported()) throw std::runtime_error("vqkern._cpu.backward_l2 needs a CPU with AVX2 and FMA");
  // Below ~16K elements per thread a thread costs more to start than it saves.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n * d / 16384)));
  std::vector<int64_t> count(diff_sums ? k : 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = idx[i];
    if (c < 0 || c >= k)
      throw std::out_of_range("vqkern._cpu.backward_l2: indices[" + std::to_string(i) + "] = " +
                              std::to_string(c) + " is outside [0, " + std::to_string(k) + ")");
    if (diff_sums) ++count[c];
  }
  if (!diff_sums) {  // rows are independent: a static row split
    parallel_for_threads(threads, [&](int t) {
      const int64_t r0 = n * t / threads, r1 = n * (t + 1) / threads;
      for (int64_t i = r0; i < r1; ++i)
        row_grad(gq + i * d, z + i * d, codebook + idx[i] * d, scale, grad_z + i * d, d);
    });
    return;
  }
  // Code ranges [bound[t], bound[t + 1]) of about n / threads rows each.
  std::vector<int64_t> bound(threads + 1, k);
  bound[0] = 0;
  for (int64_t c = 0, seen = 0, t = 1; c < k && t < threads; ++c) {
    seen += count[c];
    while (t < threads && seen >= n * t / threads) bound[t++] = c + 1;
  }
  parallel_for_threads(threads, [&](int t) {
    const int64_t c0 = bound[t], c1 = bound[t + 1];
    if (c0 >= c1) return;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = idx[i];
      if (c < c0 || c >= c1) continue;
      if (grad_z) row_both(gq + i * d, z + i * d, codebook + c * d, scale, grad_z + i * d, diff_sums + c * d, d);
      else row_sums(z + i * d, codebook + c * d, diff_sums + c * d, d);
    }
  });
}


}  // namespace

void backward_l2(const float* gq, const float* z, const float* codebook, const int64_t* idx, int64_t n, int64_t d,
                 int64_t k, float scale, float* grad_z, float* diff_sums, bool /*deterministic*/, int threads) {
  backward_rows(gq, z, codebook, idx, n, d, k, scale, grad_z, diff_sums, threads);
}

void backward_l2_bf16(const uint16_t* gq, const uint16_t* z, const uint16_t* codebook, const int64_t* idx, int64_t n,
                      int64_t d, int64_t k, float scale, uint16_t* grad_z, float* diff_sums, bool /*deterministic*/,
                      int threads) {
  backward_rows(gq, z, codebook, idx, n, d, k, scale, grad_z, diff_sums, threads);
}

}  // namespace vqkern_cpu
