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
// Blocked sums. The residuals e - z of half-precision rows against an fp32 code share
// the code's low-order bits, so a running fp32 sum of them rounds the same way at every
// step and its error grows like the rows: 166 fp32 ulps of sum|e - z| for one code of
// 10^5 fp16 rows, against 1.5 for PyTorch autograd (tests/test_precision.py). Each
// code's rows are therefore summed in pieces of kPiece rows, in row order, in the code's
// row of diff_sums; each full piece of a longer code is parked in a workspace, and the
// full pieces are added pairwise to the last one (error ~ kPiece + log2(pieces)
// roundings, not rows).
//
// Determinism. A first pass over the indices counts the rows of each code (and
// checks every index before anything is written); the codes are then cut into one
// contiguous range per thread holding about n / threads rows, and each thread walks
// all rows in order, taking those whose code is in its range. Every code's pieces and
// their pairwise sum are therefore formed by one thread in a fixed order: bitwise the
// same result for any thread count, with O(k) extra memory plus the pieces of the codes
// of more than kPiece rows (at most n / kPiece rows of d floats, kept per calling
// thread between calls), and no per-thread (k, d) partials to zero and reduce (which
// would double the traffic at k * d = n * d, e.g. 16384 x 16384 x 256).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffers.h"
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

// Rows per piece of a code's sum. 16: for 10^5 fp16 rows of one code (z independent of
// e; python -m benchmarks.sum_orders) pieces of 4, 8, 16 and 32 rows then pairwise erred
// by 2.8-2.9, 2.8-3.3, 3.3-4.6 and 6.7-6.8 fp32 ulps of sum|e - z| (a running sum:
// 2500-3100; PyTorch autograd: 144-148); the workspace holds at most n / kPiece rows.
constexpr int64_t kPiece = kBackwardPieceRows;

// The per-row updates, in fp32 whatever T is, auto-vectorized at AVX2 width
// (memory-bound: wider vectors would not move more bytes). With GRAD_Z, grad_z =
// gq + scale * diff; with SUMS, sum += e - z (sum -= diff is exactly sum += (e - z)).
template <bool GRAD_Z, bool SUMS, typename T>
__attribute__((target("avx2,fma"))) void row_update(const T* __restrict g, const T* __restrict z, const T* __restrict e,
                                                    float scale, T* __restrict gz, float* __restrict sum, int64_t d) {
  for (int64_t t = 0; t < d; ++t) {
    const float diff = to_f32(z[t]) - to_f32(e[t]);
    if constexpr (GRAD_Z) store_as(gz + t, to_f32(g[t]) + scale * diff);
    if constexpr (SUMS) sum[t] -= diff;
  }
}

// A full piece leaves the code's row for the workspace: piece = row, row = 0.
__attribute__((target("avx2,fma"))) void park_row(float* __restrict piece, float* __restrict row, int64_t d) {
  for (int64_t t = 0; t < d; ++t) {
    piece[t] = row[t];
    row[t] = 0.0f;
  }
}

__attribute__((target("avx2,fma"))) void add_row(float* __restrict dst, const float* __restrict src, int64_t d) {
  for (int64_t t = 0; t < d; ++t) dst[t] += src[t];
}

// dst += the pairwise sum of rows p[0..count) (d floats apart), summed in place.
void add_pairwise(float* dst, float* p, int64_t count, int64_t d) {
  for (int64_t s = 1; s < count; s *= 2)
    for (int64_t j = 0; j + s < count; j += 2 * s) add_row(p + j * d, p + (j + s) * d, d);
  add_row(dst, p, d);
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
      throw std::out_of_range("vqkern._cpu.backward_l2: indices[" + std::to_string(i) + "] = " + std::to_string(c) +
                              " is outside [0, " + std::to_string(k) + ")");
    if (diff_sums) ++count[c];
  }
  if (!diff_sums) {  // rows are independent: a static row split
    parallel_for_threads(threads, [&](int t) {
      const int64_t r0 = n * t / threads, r1 = n * (t + 1) / threads;
      for (int64_t i = r0; i < r1; ++i)
        row_update<true, false>(gq + i * d, z + i * d, codebook + idx[i] * d, scale, grad_z + i * d, nullptr, d);
    });
    return;
  }
  // Each code's row of diff_sums holds its open piece; a code of more than kPiece rows
  // parks each full piece in the workspace (first_piece: its first workspace row; -1: the
  // code never fills a piece before its last row), and at the end its row (the last,
  // open piece, after the caller's earlier sums) gets the pairwise sum of its full pieces.
  // The hot rows stay the (k, d) sums, as with one running sum; the workspace is written
  // once per piece and read once.
  std::vector<int64_t> first_piece(k, -1);
  int64_t pieces = 0;
  for (int64_t c = 0; c < k; ++c) {
    if (count[c] <= kPiece) continue;
    first_piece[c] = pieces;
    pieces += count[c] / kPiece;
  }
  static thread_local buffers::KeptBuffer kept;
  std::unique_ptr<unsigned char, buffers::AlignedFree> own;
  float* const work = pieces ? buffers::kept_array<float>(kept, own, static_cast<size_t>(pieces * d)) : nullptr;
  // Code ranges [bound[t], bound[t + 1]) of about n / threads rows each.
  std::vector<int64_t> bound(threads + 1, k);
  bound[0] = 0;
  for (int64_t c = 0, seen = 0, t = 1; c < k && t < threads; ++c) {
    seen += count[c];
    while (t < threads && seen >= n * t / threads) bound[t++] = c + 1;
  }
  std::vector<int64_t> rank(k, 0);  // rows of each code seen so far (codes are owned by one thread)
  parallel_for_threads(threads, [&](int t) {
    const int64_t c0 = bound[t], c1 = bound[t + 1];
    if (c0 >= c1) return;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = idx[i];
      if (c < c0 || c >= c1) continue;
      const T* e = codebook + c * d;
      float* sum = diff_sums + c * d;
      if (grad_z) row_update<true, true>(gq + i * d, z + i * d, e, scale, grad_z + i * d, sum, d);
      else row_update<false, true>(gq, z + i * d, e, scale, grad_z, sum, d);
      if (first_piece[c] >= 0 && ++rank[c] % kPiece == 0)
        park_row(work + (first_piece[c] + rank[c] / kPiece - 1) * d, sum, d);
    }
    for (int64_t c = c0; c < c1; ++c)
      if (first_piece[c] >= 0) add_pairwise(diff_sums + c * d, work + first_piece[c] * d, count[c] / kPiece, d);
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
