// Entry points of the fused search: argument checks and the choice of kernel. The
// kernels themselves are in search_avx2.cpp and search_avx512.cpp (per-function
// target attributes, so the module loads on any x86-64 CPU and only the path the
// CPU can run is ever called), the shared driver in search_driver.h.
#include <stdexcept>
#include <string>

#include "search.h"
#include "search_kernels.h"

namespace vqkern_cpu {
namespace {

void require(Isa isa, const char* what) {
  const std::string missing = isa_missing(isa);
  if (!missing.empty())
    throw std::runtime_error(std::string("vqkern._cpu.") + what + ": the " + isa_name(isa) + " path needs " + missing +
                             ", which this CPU or OS lacks");
}

}  // namespace

void search_l2(const float* z, int64_t n, int64_t ldz, const float* codebook, int64_t k, int64_t ldc, int64_t d,
               int64_t* indices, float* distances, float* quantized, int64_t ldq, int threads, Isa isa) {
  const Isa path = isa == Isa::kAvx2 ? Isa::kAvx2 : Isa::kAvx512;  // fp32 has no AMX kernel
  require(path, "search_l2");
  const driver::Problem<float> pb{z, n, ldz, codebook, k, ldc, d, indices, distances, quantized, ldq};
  if (path == Isa::kAvx2) search_f32_avx2(pb, threads);
  else search_f32_avx512(pb, threads);
}

void search_l2_bf16(const uint16_t* z, int64_t n, int64_t ldz, const uint16_t* codebook, int64_t k, int64_t ldc,
                    int64_t d, int64_t* indices, float* distances, uint16_t* quantized, int64_t ldq, int threads,
                    Isa isa) {
  const Isa path = isa == Isa::kAmx ? Isa::kAmx : Isa::kAvx512Bf16;
  require(path, "search_l2_bf16");
  const driver::Problem<uint16_t> pb{z, n, ldz, codebook, k, ldc, d, indices, distances, quantized, ldq};
  if (path == Isa::kAmx) search_bf16_amx(pb, threads);
  else search_bf16_avx512(pb, threads);
}

// The same choice of kernel as search_l2 and search_l2_bf16 above.
SearchTiles search_tiles(Isa isa, bool bf16) {
  if (bf16) return isa == Isa::kAmx ? tiles_bf16_amx() : tiles_bf16_avx512();
  return isa == Isa::kAvx2 ? tiles_f32_avx2() : tiles_f32_avx512();
}

}  // namespace vqkern_cpu
