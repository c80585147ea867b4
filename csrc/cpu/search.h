// Host entry points of vqkern._cpu (plain C++, no PyTorch headers).
#pragma once

#include <cstdint>
#include <string>

namespace vqkern_cpu {

// Instruction-set paths, in increasing order of what they need. Each one includes
// the previous ones' requirements (avx512bf16 = avx512 + AVX512-BF16, amx = that +
// AMX-TILE/AMX-BF16 + the OS's permission for tile data). fp32 runs the avx2 or the
// avx512 kernel; bf16 inputs are searched as bf16 on avx512bf16 and amx.
enum class Isa : int { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmx = 3 };
constexpr int kIsaCount = 4;

const char* isa_name(Isa isa);
// Empty when this CPU and OS can run `isa`; otherwise what is missing (e.g.
// "AVX512F (cpuid leaf 7 EBX bit 16)" or "OS support for zmm state (XCR0)").
std::string isa_missing(Isa isa);
// The best path this machine can run (avx2 at least; throws if not even that).
Isa best_isa();

// True when this CPU can run the kernels (x86-64 with AVX2 and FMA).
bool supported();

// How a search splits its work: rows per work item, codes per packed panel, and the
// fewest codes a split of the codes scans (the codes are split between threads when
// there are fewer row blocks than threads). The backend's self-check draws shapes
// that cross these boundaries.
struct SearchTiles {
  int64_t row_block;
  int64_t panel_codes;
  int64_t min_split_codes;
};
// The blocking of the kernel search_l2 (bf16 false) or search_l2_bf16 (true) runs for isa.
SearchTiles search_tiles(Isa isa, bool bf16);

// indices[i] = argmin_k |e_k|^2 - 2 z_i . e_k (lowest k on ties, NaN never wins),
// fp32, for z (n, d) with row stride ldz and codebook (k, d) with row stride ldc,
// using up to `threads` threads and the fp32 kernel of `isa` (kAvx2 or kAvx512;
// kAvx512Bf16 runs the kAvx512 one). When not null, distances[i] = sum((z_i - e)^2)
// of the chosen code (fp32, from the residual) and row i of quantized (row stride
// ldq) = the chosen code. Extra memory: the packed codebook, about k * d * 4 bytes.
void search_l2(const float* z, int64_t n, int64_t ldz, const float* codebook, int64_t k, int64_t ldc, int64_t d,
               int64_t* indices, float* distances, float* quantized, int64_t ldq, int threads, Isa isa);

// The same for bf16 z and codebook (raw 16-bit patterns): products of bf16 values
// are exact in fp32 and summed in fp32 (AVX512-BF16 vdpbf16ps), so the ranking is
// that of the fp32 search on the widened values up to accumulation order. distances
// are fp32 from the residual, quantized rows are bf16. isa: kAvx512Bf16 (vdpbf16ps)
// or kAmx (tdpbf16ps tiles).
void search_l2_bf16(const uint16_t* z, int64_t n, int64_t ldz, const uint16_t* codebook, int64_t k, int64_t ldc,
                    int64_t d, int64_t* indices, float* distances, uint16_t* quantized, int64_t ldq, int threads,
                    Isa isa);

// Rows per piece of a code's sum in backward_l2 (backward.cpp).
constexpr int64_t kBackwardPieceRows = 16;

// One pass over the rows of the straight-through + codebook-loss backward, fp32,
// contiguous row-major: grad_z[i] = gq[i] + scale * (z[i] - cb[idx[i]]) and
// diff_sums[c] += sum over rows i with idx[i] == c of (cb[c] - z[i]), the difference
// formed once per element. Either output may be null (skipped); diff_sums (k, d) is
// zero-filled by the caller. Each code's rows are summed in pieces of
// kBackwardPieceRows rows in row order, and the pieces of a longer code added pairwise.
// Codes are split into ranges of about equal row counts, one per thread, so the sums
// are bitwise the same whatever `threads` is (`deterministic` is accepted for the
// interface; every run is deterministic). Extra memory O(threads + k) int64 and the
// full pieces of the codes of more than one piece (at most n / kBackwardPieceRows rows).
// Throws std::out_of_range, before writing anything, if an index is outside [0, k).
void backward_l2(const float* gq, const float* z, const float* codebook, const int64_t* idx, int64_t n, int64_t d,
                 int64_t k, float scale, float* grad_z, float* diff_sums, bool deterministic, int threads);
// The same for bf16 gq, z, codebook and grad_z: every element widened exactly to fp32,
// the arithmetic and diff_sums (fp32) as above, grad_z rounded once to bf16.
void backward_l2_bf16(const uint16_t* gq, const uint16_t* z, const uint16_t* codebook, const int64_t* idx, int64_t n,
                      int64_t d, int64_t k, float scale, uint16_t* grad_z, float* diff_sums, bool deterministic,
                      int threads);

}  // namespace vqkern_cpu
