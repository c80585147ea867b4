// Types and entry points shared by the search kernels and their dispatcher.
#pragma once

#include <cstdint>
#include <cstring>

#include "search.h"

namespace vqkern_cpu {

// An element as fp32: fp32 itself, or a bf16 bit pattern widened exactly.
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
namespace driver {

template <int NR>
struct alignas(64) Lanes {  // running best of one row, per lane
  float val[NR];
  int32_t idx[NR];
};

template <typename T>
struct Problem {
  const T* z;
  int64_t n, ldz;
  const T* codebook;
  int64_t k, ldc, d;
  int64_t* indices;
  float* distances;  // may be null
  T* quantized;      // may be null
  int64_t ldq;
};

}  // namespace driver

// The fp32 residual sum((z - e)^2) shared by every path (AVX2 code, which every
// AVX-512 machine runs), so that all paths report bitwise the same distances.
float residual_f32(const float* z, const float* e, int64_t d);
float residual_bf16(const uint16_t* z, const uint16_t* e, int64_t d);

// The kernels of each path (search_avx2.cpp, search_avx512.cpp).
void search_f32_avx2(const driver::Problem<float>& pb, int threads);
void search_f32_avx512(const driver::Problem<float>& pb, int threads);
void search_bf16_avx512(const driver::Problem<uint16_t>& pb, int threads);
void search_bf16_amx(const driver::Problem<uint16_t>& pb, int threads);
// Each kernel's blocking (search.h, search_tiles).
SearchTiles tiles_f32_avx2();
SearchTiles tiles_f32_avx512();
SearchTiles tiles_bf16_avx512();
SearchTiles tiles_bf16_amx();

}  // namespace vqkern_cpu
