// Host entry points of vqkern._cpu (plain C++, no PyTorch headers).
#pragma once

#include <cstdint>

namespace vqkern_cpu {

// True when this CPU can run the kernels (x86-64 with AVX2 and FMA).
bool supported();

// indices[i] = argmin_k |e_k|^2 - 2 z_i . e_k (lowest k on ties), fp32, for
// z (n, d) with row stride ldz and codebook (k, d) with row stride ldc, using up
// to `threads` threads. When not null, distances[i] = sum((z_i - e)^2) of the
// chosen code (fp32, from the residual) and row i of quantized (row stride ldq)
// = the chosen code. Extra memory: the packed codebook, about k * d * 4 bytes.
void search_l2(const float* z, int64_t n, int64_t ldz, const float* codebook, int64_t k,
               int64_t ldc, int64_t d, int64_t* indices, float* distances, float* quantized,
               int64_t ldq, int threads);

}  // namespace vqkern_cpu
