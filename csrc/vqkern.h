// Host entry points of the vqkern CUDA kernels, called from bindings.cpp.
// Pointers are device pointers; every buffer is contiguous row-major; sizes and
// offsets are 64-bit. Each function enqueues on `stream` and returns without
// synchronizing; failures throw std::runtime_error naming the CUDA call.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace vqkern {

// Rows of z per block of the search kernels (the split-K decision uses it).
constexpr int kSearchRows = 64;
// Sorted rows per block of the deterministic segment sum.
constexpr int kSegmentChunkRows = 256;
// Rows per tile of the atomic backward and segment sum: each tile's rows of one code are
// summed before one atomic per code and column.
constexpr int kTileRows = 64;

// Checks that the current device can run the kernels (an image for its architecture
// is in the binary, the driver is new enough); throws naming the failing call.
std::string probe();

// Nearest code of each row of z (n, d) among codebook (k, d).
// Workspaces: norms (k,) fp32; part_scores/part_index (splits, n) fp32/int32.
// splits >= 1 divides the codes among blocks (split-K) for small n; a second
// kernel reduces the splits, gathers the code into quantized (z's dtype), and
// writes the exact residual distance sum((z - e)^2) in fp32.
// use_tensor_cores: fp16/bf16 z and codebook of the same dtype go through
// tensor-core MMA (fp32 accumulate, scores |e|^2 - 2 z.e); otherwise an fp32 FMA
// kernel ranks |e - c|^2 - 2 (z - c).(e - c) with centre c (d,) fp32 (required there,
// ignored by the MMA kernel), the mean of sampled finite rows: its rounding then scales
// with the distance of the rows and their nearest codes from c, not with |z|^2 + |e|^2.
void search(const void* z, int z_dtype, const void* codebook, int cb_dtype, int64_t n, int64_t k, int64_t d,
            const float* centre, float* norms, float* part_scores, int32_t* part_index, int splits,
            bool use_tensor_cores, int64_t* indices, float* distances, void* quantized, cudaStream_t stream);

// The straight-through backward in one pass over the rows: with diff = codebook[idx] - z
// formed once per element in fp32, grad_z (n, d) in z's dtype = grad_q - *scale * diff
// (skipped when grad_z is null) and diff_sums (k, d) fp32 += per-code sums of diff
// (skipped when null; zero-filled by the caller): the rows of one code in a tile of
// kTileRows rows are summed first (in pieces, common.cuh PieceSum), then added with one
// fp32 atomic per code and column. scale: one fp32 on the device.
void backward(const void* grad_q, int g_dtype, const void* z, int z_dtype, const void* codebook, int cb_dtype,
              const int64_t* indices, int64_t n, int64_t d, const float* scale, void* grad_z, float* diff_sums,
              cudaStream_t stream);

// counts[idx[i]] += 1, sums[idx[i], :] += values[i, :]: per-code partial sums of each tile
// of kTileRows rows, added with fp32 atomics (as the backward's diff_sums).
void segment_sum_atomic(const int64_t* indices, const void* values, int v_dtype, int64_t n, int64_t d, float* counts,
                        float* sums, cudaStream_t stream);

// Deterministic segment sum over rows sorted by code: sorted_idx (n,) ascending,
// perm (n,) the row of values for each sorted position. Fixed-order reduction:
// chunks of kSegmentChunkRows sorted rows, then the pieces of the codes that span
// chunks summed in chunk order (visiting only those codes). partial:
// (2 * ceil(n / kSegmentChunkRows), d) fp32. counts may be null (not counted). With
// base (k, d) given (non-null), the sums are of base[code] - values_i instead (the
// codebook gradient's residual sums), each difference formed in fp32.
void segment_sum_sorted(const int64_t* sorted_idx, const int64_t* perm, const void* values, int v_dtype,
                        const void* base, int base_dtype, int64_t n, int64_t d, int64_t k, float* counts, float* sums,
                        float* partial, cudaStream_t stream);

}  // namespace vqkern
