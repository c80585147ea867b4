// The ISA-independent part of the fused search: codebook packing, the work split
// between threads, the per-row lane reduction and the fused epilogue. Each kernel
// (search_avx2.cpp, search_avx512.cpp) supplies a policy type K with:
//   using T;                       element type of z and the codebook
//   static constexpr int kNr;      codes per packed panel
//   static constexpr int64_t kRowBlock;  rows per work item
//   static int64_t scratch_elems(int64_t d);  T elements of per-thread scratch
//   static int64_t panel_elems(int64_t d);  T elements of one packed panel
//   static constexpr bool kCentred;  ranks in the frame centred on the rows (below)
//   static void pack_panels(const T* cb, int64_t ldc, int64_t k, int64_t d, int64_t p0,
//                           int64_t p1, const float* centre, T* packed, float* norms);
//                         // codes minus the centre (when kCentred) and their squared norms
//   static void prepare(const T* z0, int64_t ldz, int64_t rows, int64_t d, const float* centre,
//                       T* scratch);
//                         // once per work item: the item's rows (minus the centre when
//                         // kCentred) into scratch, in the kernel's layout (a transpose,
//                         // padding), reused by every cache block of codes below
//   static void run_block(const T* z0, int64_t ldz, int64_t rows, int64_t d, const T* packed,
//                         const float* norms, int64_t p0, int64_t p1, Lanes<kNr>* lanes,
//                         T* scratch);   // rows <= kRowBlock, folds panels [p0, p1)
//   static float residual(const T* z, const T* e, int64_t d);
//   static void best_lane(const Lanes<kNr>& lanes, float& val, int32_t& idx);
//                         // the smallest score of a row's lanes, the lowest index among
//                         // equal ones (lane scores are never NaN); best_lane_scalar below
//
// Ties. Lane j of a row sees the codes kNr * p + j in increasing p and replaces its
// best only on a strictly smaller score (an ordered compare: a NaN score never wins),
// so it keeps the lowest index of its minimum; the final reduction over the lanes
// takes the smallest score and, among equal scores, the smallest index. Identical
// codes therefore tie exactly (same arithmetic in the same order) and go to the
// lowest index, as argmin. Padding codes past K have a +inf norm and never win.
//
// Frame. The fp32 scores |e|^2 - 2 z.e round at the scale of |z|^2 + |e|^2, so data far
// from the origin loses its ranking in the rounding: 50 standard deviations out (N = 4000,
// K = 1024, D = 128) the fp32 expansion picked a farther code on 48 rows, up to 0.21%
// farther. |z - e|^2 is unchanged by a common shift, so the fp32 kernels (kCentred)
// rank |e - c|^2 - 2 (z - c).(e - c) with c the median of sampled finite rows (row_centre):
// the rounding then scales with the distance of the rows and their nearest codes from c. The bf16 kernels keep the
// origin: z - c and e - c rounded back to bf16 lose 2^-9 of the spread, while 128 exact
// products of bf16 values (16 bits each) summed in fp32 chose the nearest code on every
// row out to 500 standard deviations (benchmarks/half_frame.py, docs/precision.md).
//
// Threads. Rows are cut into blocks of kRowBlock rows handed out through an atomic
// counter, so a core that the OS gives to another process slows down only the
// blocks it takes. With fewer blocks than threads the codes are split too, and the
// per-row bests of the ranges merged in range order (an earlier range wins ties).
#pragma once

// Every function here that does per-row work carries VQ_DRIVER_TARGET, the target
// attribute of the including kernel file, so the driver's loops are compiled for the
// kernel's instruction set, as the single-file AVX2 kernel's were. Only templates
// instantiated per kernel type carry it, so no out-of-line function shared between
// kernel files is compiled for AVX-512.
#ifndef VQ_DRIVER_TARGET
#error "define VQ_DRIVER_TARGET (the kernel file's target attribute) before including search_driver.h"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "buffers.h"
#include "parallel.h"
#include "search_kernels.h"

namespace vqkern_cpu {
namespace driver {

constexpr int64_t kMinSplitPanelCodes = 256;  // a split of the codes is at least this many

using buffers::aligned_array;
using buffers::AlignedFree;
using buffers::kept_array;
using buffers::KeptBuffer;

template <class K>
SearchTiles tiles() {
  return {K::kRowBlock, K::kNr, kMinSplitPanelCodes};
}

// fn(std::integral_constant<int, rows>) for a runtime rows in [1, MAX]: the
// micro-kernels are compiled for each row count of a block's remainder.
template <int MAX, class Fn>
inline void with_rows(int rows, Fn&& fn) {
  if constexpr (MAX <= 1) {
    fn(std::integral_constant<int, 1>{});
  } else {
    if (rows >= MAX) fn(std::integral_constant<int, MAX>{});
    else with_rows<MAX - 1>(rows, fn);
  }
}

template <typename Fn>
void parallel(int threads, Fn&& fn) {
  parallel_for_threads(threads, [&](int) { fn(); });
}

// The smallest score over a row's lanes and, among equal scores, the smallest index.
template <int NR>
inline void best_lane_scalar(const Lanes<NR>& lanes, float& val, int32_t& idx) {
  float best = lanes.val[0];
  int32_t at = lanes.idx[0];
  for (int j = 1; j < NR; ++j) {
    const float v = lanes.val[j];
    const int32_t i = lanes.idx[j];
    if (v < best || (v == best && i < at)) {
      best = v;
      at = i;
    }
  }
  val = best;
  idx = at;
}

// The chosen code's row and exact distance, while the row is in L1.
template <class K>
VQ_DRIVER_TARGET void epilogue(const Problem<typename K::T>& pb, int64_t row, int32_t idx) {
  using T = typename K::T;
  pb.indices[row] = idx;
  const T* e = pb.codebook + static_cast<int64_t>(idx) * pb.ldc;
  if (pb.distances) pb.distances[row] = K::residual(pb.z + row * pb.ldz, e, pb.d);
  if (pb.quantized) std::memcpy(pb.quantized + row * pb.ldq, e, static_cast<size_t>(pb.d) * sizeof(T));
}

// Rows [r0, r1) against code panels [q0, q1). With part_val null, the rows' answers
// go through the epilogue; otherwise each row's best (score, index) over these
// panels is stored there (row r at offset r) for a merge across panel ranges.
template <class K>
VQ_DRIVER_TARGET void search_rows(const Problem<typename K::T>& pb, int64_t r0, int64_t r1, const typename K::T* packed,
                                  const float* norms, const float* centre, int64_t q0, int64_t q1, Lanes<K::kNr>* lanes,
                                  typename K::T* scratch, float* part_val, int32_t* part_idx) {
  constexpr int NR = K::kNr;
  const int64_t rows = r1 - r0;
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(lanes[r].val, lanes[r].val + NR, std::numeric_limits<float>::infinity());
    for (int j = 0; j < NR; ++j) lanes[r].idx[j] = static_cast<int32_t>(q0 * NR + j);
  }
  // Code panels per cache block: the packed codes one micro-block walks before the
  // next micro-block starts stay in L2 (about 256 KB of packed codes).
  const int64_t panel_bytes = K::panel_elems(pb.d) * static_cast<int64_t>(sizeof(typename K::T));
  const int64_t step = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, panel_bytes));
  K::prepare(pb.z + r0 * pb.ldz, pb.ldz, rows, pb.d, centre, scratch);
  for (int64_t p0 = q0; p0 < q1; p0 += step)
    K::run_block(pb.z + r0 * pb.ldz, pb.ldz, rows, pb.d, packed, norms, p0, std::min(q1, p0 + step), lanes, scratch);
  for (int64_t r = 0; r < rows; ++r) {
    float best;
    int32_t idx;
    K::best_lane(lanes[r], best, idx);
    if (part_val) {
      part_val[r0 + r] = best;
      part_idx[r0 + r] = idx;
    } else {
      epilogue<K>(pb, r0 + r, idx);
    }
  }
}

// The centre of the ranking frame: per coordinate, the lower median of the finite rows
// among min(n, kCentreRows) evenly spaced rows of z (row j * n / m); zeros when none is
// finite. The same rows and the same order statistic as
// vqkern.backends._frame.frame_centre, so the same centre (both pick one of the values).
// One thread: the sample is copied column by column (at most 1024 x d floats), then one
// nth_element per column. Zeros too when |c|^2 is at most the rows' median |z - c|^2.
// Rows, not codes: codes the rows never reach, far away, would pull a codebook centre
// off the data and round the scores of the codes near it coarsely. A median, not a mean:
// padding or outlier rows (less than half the sample) do not move it off the data.
constexpr int64_t kCentreRows = 1024;

template <typename T>
VQ_DRIVER_TARGET void row_centre(const Problem<T>& pb, float* centre) {
  const int64_t n = pb.n, d = pb.d, m = std::min<int64_t>(n, kCentreRows);
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) {
    const T* z = pb.z + (j * n / m) * pb.ldz;
    bool ok = true;
    for (int64_t t = 0; t < d; ++t) ok &= std::isfinite(to_f32(z[t]));
    if (ok) rows.push_back(j * n / m);
  }
  const int64_t count = static_cast<int64_t>(rows.size());
  if (count == 0) {
    std::fill(centre, centre + d, 0.0f);
    return;
  }
  // Column-major copy of the finite sampled rows: each column's order statistic in place.
  std::vector<float> cols(static_cast<size_t>(count * d));
  for (int64_t r = 0; r < count; ++r) {
    const T* z = pb.z + rows[r] * pb.ldz;
    for (int64_t t = 0; t < d; ++t) cols[t * count + r] = to_f32(z[t]);
  }
  const int64_t mid = (count - 1) / 2;  // the lower of the two middle values, as torch.median
  for (int64_t t = 0; t < d; ++t) {
    float* col = cols.data() + t * count;
    std::nth_element(col, col + mid, col + count);
    centre[t] = col[mid];
  }
  // Centre only data that sit off the origin: when |c|^2 is at most the lower median of the
  // rows' |z - c|^2 the origin's frame rounds no coarser, and it keeps the plain expansion
  // (and the fine structure near 0, which moving by c would round away). In fp64, as
  // frame_centre.
  std::vector<double> spread(static_cast<size_t>(count));
  for (int64_t r = 0; r < count; ++r) {
    const T* z = pb.z + rows[r] * pb.ldz;
    double s = 0.0;
    for (int64_t t = 0; t < d; ++t) {
      const double v = static_cast<double>(to_f32(z[t])) - static_cast<double>(centre[t]);
      s += v * v;
    }
    spread[r] = s;
  }
  std::nth_element(spread.begin(), spread.begin() + mid, spread.end());
  double c2 = 0.0;
  for (int64_t t = 0; t < d; ++t) c2 += static_cast<double>(centre[t]) * static_cast<double>(centre[t]);
  if (!(c2 > spread[mid])) std::fill(centre, centre + d, 0.0f);
}

template <class K>
VQ_DRIVER_TARGET void search(const Problem<typename K::T>& pb, int threads) {
  using T = typename K::T;
  constexpr int NR = K::kNr;
  const int64_t n = pb.n, k = pb.k, d = pb.d;
  if (n <= 0) return;
  if (k < 1 || d < 1) throw std::invalid_argument("vqkern._cpu.search_l2: k and d must be >= 1");
  if (k > std::numeric_limits<int32_t>::max() - NR)
    throw std::invalid_argument("vqkern._cpu.search_l2: k must be < 2^31 - 64");
  const int64_t panels = (k + NR - 1) / NR;
  static thread_local KeptBuffer kept_packed, kept_norms;
  std::unique_ptr<unsigned char, AlignedFree> own_packed, own_norms;
  T* const packed = kept_array<T>(kept_packed, own_packed, static_cast<size_t>(panels * K::panel_elems(d)));
  float* const norms = kept_array<float>(kept_norms, own_norms, static_cast<size_t>(panels * NR));

  const int64_t blocks = (n + K::kRowBlock - 1) / K::kRowBlock;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, std::max(blocks, panels))));
  std::atomic<int64_t> next_panel{0}, next_block{0};
  const int64_t pack_chunk = std::max<int64_t>(1, 1024 / NR);  // panels per packing work item
  std::vector<float> centre_store(K::kCentred ? static_cast<size_t>(d) : 0);
  const float* const centre = K::kCentred ? centre_store.data() : nullptr;
  if constexpr (K::kCentred) row_centre(pb, centre_store.data());
  // Pack in parallel, then join: the search needs every panel.
  parallel(threads, [&] {
    for (int64_t p0; (p0 = next_panel.fetch_add(pack_chunk)) < panels;)
      K::pack_panels(pb.codebook, pb.ldc, k, d, p0, std::min(panels, p0 + pack_chunk), centre, packed, norms);
  });
  const int64_t min_split = std::max<int64_t>(1, kMinSplitPanelCodes / NR);
  const int64_t splits =
      blocks >= threads ? 1
                        : std::max<int64_t>(1, std::min<int64_t>((threads + blocks - 1) / blocks, panels / min_split));
  const int64_t items = blocks * splits;
  std::vector<float> part_val(splits > 1 ? static_cast<size_t>(splits * n) : 0);
  std::vector<int32_t> part_idx(part_val.size());
  threads = static_cast<int>(std::min<int64_t>(threads, items));
  parallel(threads, [&] {
    std::vector<Lanes<NR>> lanes(K::kRowBlock);
    auto scratch = aligned_array<T>(static_cast<size_t>(K::scratch_elems(d)));
    for (int64_t item; (item = next_block.fetch_add(1)) < items;) {
      const int64_t b = item / splits, sp = item % splits;
      const int64_t r0 = b * K::kRowBlock;
      search_rows<K>(pb, r0, std::min(n, r0 + K::kRowBlock), packed, norms, centre, sp * panels / splits,
                     (sp + 1) * panels / splits, lanes.data(), scratch.get(),
                     splits > 1 ? part_val.data() + sp * n : nullptr, splits > 1 ? part_idx.data() + sp * n : nullptr);
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
    epilogue<K>(pb, row, idx);
  }
}

// The squared norms of panel p's NR codes, norm_j = fma(e_t, e_t, norm_j) for t = 0..d-1
// in that order, as every kernel must rank with the same norms; value(j, t) is code
// NR p + j's element t as fp32 (any value for a padding code, whose norm is +inf).
// The NR sums run side by side (j innermost, vectorized where value allows), not one
// after the other: one code's sum is a chain of dependent FMAs, 4 cycles each, and
// packing 16384 x 256 codes that way took 10 ms, as long as a 32-row search of them.
//
// The fma is written out, not left to the compiler's contraction of norm += e * e:
// packing runs inside the parallel() lambda, which the main thread runs inlined into
// search<K> (an FMA target, so the sum was contracted to vfmadd) and each worker runs
// as the out-of-line lambda (no target, so vmulss + vaddss). Which thread packed which
// panels then decided how each norm was rounded, and on near-ties (unit vectors a few
// ulps apart) the index changed from call to call and with the thread count.
template <int NR, class Value>
VQ_DRIVER_TARGET inline void panel_norms(int64_t p, int64_t k, int64_t d, Value&& value, float* norms) {
  alignas(64) float acc[NR] = {};
  for (int64_t t = 0; t < d; ++t)
    for (int j = 0; j < NR; ++j) {
      const float v = value(j, t);
      acc[j] = std::fma(v, v, acc[j]);
    }
  for (int j = 0; j < NR; ++j) norms[p * NR + j] = p * NR + j < k ? acc[j] : std::numeric_limits<float>::infinity();
}

// fp32 codes [NR p0, NR p1) minus the centre into d-major panels (panel[t][j] =
// e_{NR p + j}[t] - centre[t]) with their squared norms (panel_norms); padding codes get
// zeros and a +inf norm.
template <int NR>
VQ_DRIVER_TARGET void pack_panels_f32(const float* codebook, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                                      const float* centre, float* packed, float* norms) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = packed + p * d * NR;
    // t outer, codes inner: each panel row is written whole, in order, while the NR
    // code rows being read stay in L1 (codes outer wrote every line of the panel NR
    // times, 4 bytes at a time).
    const float* rows[NR];
    for (int j = 0; j < NR; ++j) rows[j] = p * NR + j < k ? codebook + (p * NR + j) * ldc : nullptr;
    for (int64_t t = 0; t < d; ++t)
      for (int j = 0; j < NR; ++j) panel[t * NR + j] = rows[j] ? rows[j][t] - centre[t] : 0.0f;
    panel_norms<NR>(p, k, d, [&](int j, int64_t t) { return panel[t * NR + j]; }, norms);
  }
}

}  // namespace driver

}  // namespace vqkern_cpu
