// Shared helpers for the vqkern CUDA kernels: error checks, dtype codes, loads.
// No PyTorch headers: everything here is plain CUDA so the binary does not tie
// itself to one PyTorch release.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vqkern {

// dtype codes shared with vqkern/backends/cuda.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("vqkern._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

// Check a runtime call; the message names the call so a failure can be traced.
#define VQ_CUDA_CHECK(call)                                           \
  do {                                                                \
    cudaError_t vq_err_ = (call);                                     \
    if (vq_err_ != cudaSuccess) ::vqkern::throw_cuda(vq_err_, #call); \
  } while (0)

// Check a kernel launch (configuration errors surface through cudaGetLastError).
#define VQ_LAUNCH_CHECK(name)                                                     \
  do {                                                                            \
    cudaError_t vq_err_ = cudaGetLastError();                                     \
    if (vq_err_ != cudaSuccess) ::vqkern::throw_cuda(vq_err_, "launch of " name); \
  } while (0)

inline void check_dtype(int dtype, const char* arg) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string("vqkern._C: ") + arg + " has unsupported dtype code " +
                                std::to_string(dtype) + " (0=float32, 1=float16, 2=bfloat16)");
}

// The dtype is uniform over a launch, so this switch never diverges inside a warp;
// it keeps one kernel per op instead of one per dtype combination (build time).
__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// (score, index) order: smaller score wins, equal scores go to the lower index
// (torch.argmin's rule). NaN scores never win, so a NaN code cannot be chosen
// over a finite one.
__device__ __forceinline__ bool better(float s, int i, float best_s, int best_i) {
  return s < best_s || (s == best_s && i < best_i);
}

// A running fp32 sum kept in pieces of kPieceTerms terms: the terms go into `piece`, and
// each full piece is added to `total`. The residuals e - z of half-precision rows against
// one fp32 code share the code's low-order bits, so a plain running sum of them rounds the
// same way at every step and errs like the number of terms (166 fp32 ulps of sum|e - z|
// at 10^5 fp16 rows against PyTorch autograd's 1.5); in pieces it errs like
// kPieceTerms + terms / kPieceTerms roundings.
constexpr int kPieceTerms = 16;

struct PieceSum {
  float total = 0.f, piece = 0.f;
  int terms = 0;
  __device__ __forceinline__ void add(float v) {
    piece += v;
    if (++terms == kPieceTerms) {
      total += piece;
      piece = 0.f;
      terms = 0;
    }
  }
  __device__ __forceinline__ float value() const { return total + piece; }
};

inline int ceil_div_int(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace vqkern
