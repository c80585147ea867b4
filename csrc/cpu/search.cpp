// Fused nearest-code search on the CPU (fp32, x86-64 AVX2 + FMA): the scores
// |e|^2 - 2 z.e of a 6-row x 16-code block are computed in registers and folded
// straight into a running (score, index) per row and lane, so no rows x codes
// score matrix is ever written, not even a cache-sized tile.
//
// Layout. The codebook is packed once per call into panels of 16 codes, each
// stored d-major (panel[d][j] = e_{16p+j}[d]), so one d step of the micro-kernel
// is two 8-wide loads of codes, six broadcasts of z and twelve FMAs (the usual
// 6 x 16 register block of AVX2 GEMM kernels: 12 accumulators, 2 code vectors,
// 1 broadcast). Codes past K pad the last panel with zeros and a +inf norm, so
// they never win.
//
// Ties. Lane j of a row sees the codes 16p + j in increasing p and replaces its
// best only on a strictly smaller score, so it keeps the lowest index of its
// minimum; the final reduction over the 16 lanes takes the smallest score and,
// among equal scores, the smallest index. Identical codes therefore tie exactly
// (same arithmetic in the same order) and go to the lowest index, as argmin.
//
// Threads. Rows are cut into blocks of kRowBlock rows handed out through an
// atomic counter, so a core that the OS gives to another process slows down
// only the blocks it takes. Each thread keeps its own lane state; nothing is
// shared but the packed codebook (read-only) and disjoint output rows.
#include "search.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace vqkern_cpu {
namespace {

constexpr int kMr = 6;           // rows per micro-kernel
constexpr int kNr = 16;          // codes per panel (two AVX2 vectors)
constexpr int64_t kRowBlock = 96;  // rows per work item: 16 micro-blocks, ~24 KB of z at D = 64
constexpr int64_t kMinSplitPanels = 16;  // a split of the codes is at least 256 of them

// Code panels per cache block: the packed codes a micro-block walks before moving
// to the next micro-block stay in L2 (about 256 KB of packed codes).
int64_t panels_per_block(int64_t d) {
  const int64_t bytes_per_panel = d * kNr * 4;
  return std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, bytes_per_panel));
}

struct Problem {
  const float* z;
  int64_t n, ldz;
  const float* codebook;
  int64_t k, ldc, d;
  int64_t* indices;
  float* distances;  // may be null
  float* quantized;  // may be null
  int64_t ldq;
};

struct Lanes {  // running best of one row, per lane
  alignas(32) float val[kNr];
  alignas(32) int32_t idx[kNr];
};

// Scores of MR rows x 16 codes of one panel, folded into the rows' lane state.
template <int MR>
__attribute__((target("avx2,fma"))) void micro_kernel(const float* const* zrow, const float* panel,
                                                      const float* norms, int64_t d, int32_t base,
                                                      Lanes* lanes) {
  __m256 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t t = 0; t < d; ++t) {
    const __m256 e0 = _mm256_load_ps(panel + t * kNr);
    const __m256 e1 = _mm256_load_ps(panel + t * kNr + 8);
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
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[r].idx),
                       _mm256_blendv_epi8(c0, i0, _mm256_castps_si256(lt0)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[r].idx + 8),
                       _mm256_blendv_epi8(c1, i1, _mm256_castps_si256(lt1)));
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void run_panels(const float* const* zrow, const float* packed,
                                                    const float* norms, int64_t d, int64_t p0,
                                                    int64_t p1, Lanes* lanes) {
  for (int64_t p = p0; p < p1; ++p)
    micro_kernel<MR>(zrow, packed + p * d * kNr, norms + p * kNr, d, static_cast<int32_t>(p * kNr),
                     lanes);
}

// sum((z - e)^2) in fp32, eight partial sums (relative error <= about d/8 * 2^-24).
__attribute__((target("avx2,fma"))) float residual(const float* z, const float* e, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(z + t), _mm256_loadu_ps(e + t));
    acc = _mm256_fmadd_ps(diff, diff, acc);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; t < d; ++t) {
    const float diff = z[t] - e[t];
    sum += diff * diff;
  }
  return sum;
}

// The chosen code's row and exact distance, while the row is in L1.
__attribute__((target("avx2,fma"))) void epilogue(const Problem& pb, int64_t row, int32_t idx) {
  pb.indices[row] = idx;
  const float* e = pb.codebook + static_cast<int64_t>(idx) * pb.ldc;
  if (pb.distances) pb.distances[row] = residual(pb.z + row * pb.ldz, e, pb.d);
  if (pb.quantized) std::memcpy(pb.quantized + row * pb.ldq, e, static_cast<size_t>(pb.d) * sizeof(float));
}

// Rows [r0, r1) against code panels [q0, q1). With part_val/part_idx null, the rows'
// answers go through the epilogue; otherwise each row's best (score, index) over these
// panels is stored there (row r at offset r) for a merge across panel ranges.
__attribute__((target("avx2,fma"))) void search_rows(const Problem& pb, int64_t r0, int64_t r1,
                                                     const float* packed, const float* norms,
                                                     int64_t q0, int64_t q1, Lanes* lanes,
                                                     float* part_val, int32_t* part_idx) {
  const float* z = pb.z;
  const int64_t ldz = pb.ldz, d = pb.d;
  const int64_t rows = r1 - r0;
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(lanes[r].val, lanes[r].val + kNr, std::numeric_limits<float>::infinity());
    for (int j = 0; j < kNr; ++j) lanes[r].idx[j] = static_cast<int32_t>(q0 * kNr + j);
  }
  const int64_t step = panels_per_block(d);
  for (int64_t p0 = q0; p0 < q1; p0 += step) {
    const int64_t p1 = std::min(q1, p0 + step);
    for (int64_t m = 0; m < rows; m += kMr) {
      const float* zrow[kMr];
      const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - m));
      for (int r = 0; r < mr; ++r) zrow[r] = z + (r0 + m + r) * ldz;
      Lanes* l = lanes + m;
      switch (mr) {
        case 6: run_panels<6>(zrow, packed, norms, d, p0, p1, l); break;
        case 5: run_panels<5>(zrow, packed, norms, d, p0, p1, l); break;
        case 4: run_panels<4>(zrow, packed, norms, d, p0, p1, l); break;
        case 3: run_panels<3>(zrow, packed, norms, d, p0, p1, l); break;
        case 2: run_panels<2>(zrow, packed, norms, d, p0, p1, l); break;
        default: run_panels<1>(zrow, packed, norms, d, p0, p1, l); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float best = lanes[r].val[0];
    int32_t idx = lanes[r].idx[0];
    for (int j = 1; j < kNr; ++j) {
      const float v = lanes[r].val[j];
      const int32_t i = lanes[r].idx[j];
      if (v < best || (v == best && i < idx)) {
        best = v;
        idx = i;
      }
    }
    if (part_val) {
      part_val[r0 + r] = best;
      part_idx[r0 + r] = idx;
    } else {
      epilogue(pb, r0 + r, idx);
    }
  }
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// Packs codes [16 p0, 16 p1) into d-major panels and computes their squared norms
// (fp32, in d order); padding codes get zeros and a +inf norm.
void pack_panels(const float* codebook, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                 float* packed, float* norms) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = packed + p * d * kNr;
    for (int j = 0; j < kNr; ++j) {
      const int64_t code = p * kNr + j;
      if (code < k) {
        const float* e = codebook + code * ldc;
        float norm = 0.0f;
        for (int64_t t = 0; t < d; ++t) {
          panel[t * kNr + j] = e[t];
          norm += e[t] * e[t];
        }
        norms[p * kNr + j] = norm;
      } else {
        for (int64_t t = 0; t < d; ++t) panel[t * kNr + j] = 0.0f;
        norms[p * kNr + j] = std::numeric_limits<float>::infinity();
      }
    }
  }
}

template <typename Fn>
void parallel(int threads, Fn&& fn) {
  if (threads <= 1) {
    fn();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(fn);
  fn();
  for (auto& th : pool) th.join();
}

}  // namespace

bool supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void search_l2(const float* z, int64_t n, int64_t ldz, const float* codebook, int64_t k,
               int64_t ldc, int64_t d, int64_t* indices, float* distances, float* quantized,
               int64_t ldq, int threads) {
  if (!supported()) throw std::runtime_error("vqkern._cpu.search_l2 needs a CPU with AVX2 and FMA");
  if (n <= 0) return;
  if (k < 1 || d < 1) throw std::invalid_argument("vqkern._cpu.search_l2: k and d must be >= 1");
  if (k > std::numeric_limits<int32_t>::max() - kNr)
    throw std::invalid_argument("vqkern._cpu.search_l2: k must be < 2^31 - 16");
  const int64_t panels = (k + kNr - 1) / kNr;
  const size_t packed_bytes = static_cast<size_t>(panels * d * kNr) * sizeof(float);
  std::unique_ptr<float, AlignedFree> packed(
      static_cast<float*>(std::aligned_alloc(64, (packed_bytes + 63) / 64 * 64)));
  std::unique_ptr<float, AlignedFree> norms(static_cast<float*>(
      std::aligned_alloc(64, (static_cast<size_t>(panels * kNr) * sizeof(float) + 63) / 64 * 64)));
  if (!packed || !norms) throw std::bad_alloc();

  const Problem pb{z, n, ldz, codebook, k, ldc, d, indices, distances, quantized, ldq};
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, std::max(blocks, panels))));
  std::atomic<int64_t> next_panel{0}, next_block{0};
  constexpr int64_t kPackChunk = 64;  // panels per packing work item
  // Pack in parallel, then join: the search needs every panel.
  parallel(threads, [&] {
    for (int64_t p0; (p0 = next_panel.fetch_add(kPackChunk)) < panels;)
      pack_panels(codebook, ldc, k, d, p0, std::min(panels, p0 + kPackChunk), packed.get(), norms.get());
  });
  // Fewer row blocks than threads (small n): each block's codes are also split into
  // `splits` panel ranges of at least kMinSplitPanels, searched as separate work items
  // whose per-row bests are merged afterwards in range order (earlier range wins ties).
  const int64_t splits = blocks >= threads ? 1
      : std::max<int64_t>(1, std::min<int64_t>((threads + blocks - 1) / blocks, panels / kMinSplitPanels));
  const int64_t items = blocks * splits;
  std::vector<float> part_val(splits > 1 ? static_cast<size_t>(splits * n) : 0);
  std::vector<int32_t> part_idx(part_val.size());
  threads = static_cast<int>(std::min<int64_t>(threads, items));
  parallel(threads, [&] {
    std::vector<Lanes> lanes(kRowBlock);
    for (int64_t item; (item = next_block.fetch_add(1)) < items;) {
      const int64_t b = item / splits, sp = item % splits;
      const int64_t r0 = b * kRowBlock;
      search_rows(pb, r0, std::min(n, r0 + kRowBlock), packed.get(), norms.get(), sp * panels / splits,
                  (sp + 1) * panels / splits, lanes.data(), splits > 1 ? part_val.data() + sp * n : nullptr,
                  splits > 1 ? part_idx.data() + sp * n : nullptr);
    }
  });
  for (int64_t row = 0; splits > 1 && row < n; ++row) {
    float best = part_val[row];
    int32_t idx = part_idx[row];
    for (int64_t sp = 1; sp < splits; ++sp) {
      if (part_val[sp * n + row] < best) {
        best = part_val[sp * n + row];
        idx = part_idx[sp * n + row];
      }
    }
    epilogue(pb, row, idx);
  }
}

}  // namespace vqkern_cpu
