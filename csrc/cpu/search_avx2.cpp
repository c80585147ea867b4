// AVX2 + FMA search kernel: the scores |e|^2 - 2 z.e of a 6-row x 16-code block are
// computed in registers and folded straight into a running (score, index) per row
// and lane, so no rows x codes score matrix is ever written, not even a tile.
//
// One d step of the micro-kernel is two 8-wide loads of codes, six broadcasts of z
// and twelve FMAs (the usual 6 x 16 register block of AVX2 GEMM kernels: 12
// accumulators, 2 code vectors, 1 broadcast, of 16 ymm registers).
#include <immintrin.h>
#include <cmath>

#define VQ_DRIVER_TARGET __attribute__((target("avx2,fma")))
#include "search_driver.h"

namespace vqkern_cpu {
namespace {

using driver::Lanes;

struct Avx2F32 {
  using T = float;
  static constexpr int kMr = 6;
  static constexpr int kNr = 16;
  static constexpr int64_t kRowBlock = 96;  // 16 micro-blocks, ~24 KB of z at D = 64
  static constexpr bool kCentred = true;
  static int64_t scratch_elems(int64_t d) { return kRowBlock * d; }
  static int64_t panel_elems(int64_t d) { return d * kNr; }
  static void pack_panels(const float* cb, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                          const float* centre, float* packed, float* norms) {
    driver::pack_panels_f32<kNr>(cb, ldc, k, d, p0, p1, centre, packed, norms);
  }
  // The item's rows minus the centre, row-major in scratch (the micro-kernel reads them there).
  __attribute__((target("avx2,fma"))) static void prepare(const float* z0, int64_t ldz, int64_t rows, int64_t d,
                                                          const float* centre, float* zc) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < d; ++t) zc[r * d + t] = z0[r * ldz + t] - centre[t];
  }
  static void run_block(const float* z0, int64_t ldz, int64_t rows, int64_t d, const float* packed, const float* norms,
                        int64_t p0, int64_t p1, Lanes<kNr>* lanes, float* scratch);
  static float residual(const float* z, const float* e, int64_t d) { return residual_f32(z, e, d); }
  static void best_lane(const Lanes<kNr>& l, float& val, int32_t& idx) { driver::best_lane_scalar(l, val, idx); }
};

// Scores of MR rows x 16 codes of one panel, folded into the rows' lane state.
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void micro_kernel(const float* const* zrow,
                                                                            const float* panel, const float* norms,
                                                                            int64_t d, int32_t base, Lanes<16>* lanes) {
  __m256 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t t = 0; t < d; ++t) {
    const __m256 e0 = _mm256_load_ps(panel + t * 16);
    const __m256 e1 = _mm256_load_ps(panel + t * 16 + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 zv = _mm256_broadcast_ss(zrow[r] + t);
      acc0[r] = _mm256_fmadd_ps(zv, e0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(zv, e1, acc1[r]);
    }
  }
  const __m256 minus2 = _mm256_set1_ps(-2.0f);
  const __m256 n0 = _mm256_load_ps(norms);
  const __m256 n1 = _mm256_load_ps(norms + 8);
  const __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
  for (int r = 0; r < MR; ++r) {
    const __m256 s0 = _mm256_fmadd_ps(acc0[r], minus2, n0);  // |e|^2 - 2 z.e
    const __m256 s1 = _mm256_fmadd_ps(acc1[r], minus2, n1);
    const __m256 b0 = _mm256_load_ps(lanes[r].val);
    const __m256 b1 = _mm256_load_ps(lanes[r].val + 8);
    const __m256 lt0 = _mm256_cmp_ps(s0, b0, _CMP_LT_OQ);  // strict: earlier codes keep ties
    const __m256 lt1 = _mm256_cmp_ps(s1, b1, _CMP_LT_OQ);
    _mm256_store_ps(lanes[r].val, _mm256_blendv_ps(b0, s0, lt0));
    _mm256_store_ps(lanes[r].val + 8, _mm256_blendv_ps(b1, s1, lt1));
    const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[r].idx));
    const __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[r].idx + 8));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[r].idx), _mm256_blendv_epi8(c0, i0, _mm256_castps_si256(lt0)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[r].idx + 8),
                       _mm256_blendv_epi8(c1, i1, _mm256_castps_si256(lt1)));
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void run_panels(const float* const* zrow, const float* packed, const float* norms,
                                                    int64_t d, int64_t p0, int64_t p1, Lanes<16>* lanes) {
  _mm256_zeroupper();
  for (int64_t p = p0; p < p1; ++p)
    micro_kernel<MR>(zrow, packed + p * d * 16, norms + p * 16, d, static_cast<int32_t>(p * 16), lanes);
}

void Avx2F32::run_block(const float*, int64_t, int64_t rows, int64_t d, const float* packed, const float* norms,
                        int64_t p0, int64_t p1, Lanes<kNr>* lanes, float* zc) {
  for (int64_t m = 0; m < rows; m += kMr) {
    const float* zrow[kMr];
    const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - m));
    for (int r = 0; r < mr; ++r) zrow[r] = zc + (m + r) * d;
    Lanes<kNr>* l = lanes + m;
    driver::with_rows<kMr>(
        mr, [&](auto rows_c) { run_panels<decltype(rows_c)::value>(zrow, packed, norms, d, p0, p1, l); });
  }
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 acc) {
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

__attribute__((target("avx2,fma"))) inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) { return load_bf16x8(p); }

}  // namespace

// sum((z - e)^2) in fp32 (bf16 rows widened exactly first), eight partial sums (relative
// error <= about d/8 * 2^-24); the tail's fma is spelled out so its rounding never
// depends on the compiler's contraction choice.
template <typename T>
__attribute__((target("avx2,fma"))) inline float residual_avx2(const T* z, const T* e, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    const __m256 diff = _mm256_sub_ps(load8(z + t), load8(e + t));
    acc = _mm256_fmadd_ps(diff, diff, acc);
  }
  float sum = hsum8(acc);
  for (; t < d; ++t) {
    const float diff = to_f32(z[t]) - to_f32(e[t]);
    sum = std::fma(diff, diff, sum);
  }
  return sum;
}

__attribute__((target("avx2,fma"))) float residual_f32(const float* z, const float* e, int64_t d) {
  return residual_avx2(z, e, d);
}

__attribute__((target("avx2,fma"))) float residual_bf16(const uint16_t* z, const uint16_t* e, int64_t d) {
  return residual_avx2(z, e, d);
}

void search_f32_avx2(const driver::Problem<float>& pb, int threads) { driver::search<Avx2F32>(pb, threads); }
SearchTiles tiles_f32_avx2() { return driver::tiles<Avx2F32>(); }

}  // namespace vqkern_cpu
