// AVX-512 search kernels, fp32 (AVX512F FMA) and bf16 (AVX512-BF16 vdpbf16ps), both
// with a 14-row x 32-code register block: 28 zmm accumulators, 2 code vectors, and
// z broadcast straight from memory into the FMA ({1to16}), 30 of 32 registers. A d
// step is 2 vector loads + 14 broadcast loads for 28 FMAs, within two loads per
// cycle at two FMAs per cycle. The 14 rows are first copied d-major into scratch
// (zp[t * 14 + r]) so all broadcasts address one pointer with constant offsets:
// 14 row pointers would not fit the 16 general registers beside the loop state.
//
// Folding 32 scores of a row into its lane state costs 2 FMAs (|e|^2 - 2 acc), 2
// loads, 2 ordered compares into mask registers and 4 masked stores, against
// 2 * d FMAs of the dot products: 6% at d = 64.
//
// The fp32 kernel computes each score with the same operations in the same order as
// the AVX2 kernel (acc = fma(z_t, e_t, acc) for t = 0..d-1, then fma(acc, -2, |e|^2)
// with the same norms), so the two paths give bitwise the same indices.
#include <immintrin.h>

#define VQ_TARGET_512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define VQ_DRIVER_TARGET VQ_TARGET_512
#include "search_driver.h"
#define VQ_TARGET_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))

namespace vqkern_cpu {
namespace {

using driver::Lanes;
constexpr int kMr = 14;
constexpr int kNr = 32;
constexpr int kAmxRows = 32;  // rows per AMX step (two 16-row A tiles)

// Folds MR rows' 32 scores (acc0 codes 0-15, acc1 codes 16-31) into their lanes.
//
// MERGE: the two halves of each row are merged first: lane j keeps the better of
// codes base + j and base + 16 + j (the second only when strictly smaller, or when the
// first is NaN), and only that score is folded into lane j's state. Lane j still sees
// its codes in increasing order, so ties keep the lowest index; lanes 16-31 are never
// written. Two masked stores per row instead of four: stores, not arithmetic, bound
// the fold when the products come from the tile unit (the AMX kernel; in the fp32
// kernel the FMAs dominate and the plain fold stays).
template <int MR, bool MERGE = false>
VQ_TARGET_512 inline void fold(const __m512* acc0, const __m512* acc1, const float* norms, int32_t base,
                               Lanes<kNr>* lanes) {
  const __m512 minus2 = _mm512_set1_ps(-2.0f);
  const __m512 n0 = _mm512_load_ps(norms);
  const __m512 n1 = _mm512_load_ps(norms + 16);
  const __m512i i0 = _mm512_add_epi32(_mm512_set1_epi32(base),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(16));
  for (int r = 0; r < MR; ++r) {
    const __m512 s0 = _mm512_fmadd_ps(acc0[r], minus2, n0);  // |e|^2 - 2 z.e
    const __m512 s1 = _mm512_fmadd_ps(acc1[r], minus2, n1);
    // Strict and ordered: earlier codes keep ties, NaN never replaces.
    if constexpr (MERGE) {
      const __mmask16 second = _mm512_cmp_ps_mask(s1, s0, _CMP_LT_OQ) | _mm512_cmp_ps_mask(s0, s0, _CMP_UNORD_Q);
      const __m512 s = _mm512_mask_mov_ps(s0, second, s1);
      const __mmask16 lt = _mm512_cmp_ps_mask(s, _mm512_load_ps(lanes[r].val), _CMP_LT_OQ);
      _mm512_mask_store_ps(lanes[r].val, lt, s);
      _mm512_mask_store_epi32(lanes[r].idx, lt, _mm512_mask_mov_epi32(i0, second, i1));
    } else {
      const __mmask16 lt0 = _mm512_cmp_ps_mask(s0, _mm512_load_ps(lanes[r].val), _CMP_LT_OQ);
      const __mmask16 lt1 = _mm512_cmp_ps_mask(s1, _mm512_load_ps(lanes[r].val + 16), _CMP_LT_OQ);
      _mm512_mask_store_ps(lanes[r].val, lt0, s0);
      _mm512_mask_store_ps(lanes[r].val + 16, lt1, s1);
      _mm512_mask_store_epi32(lanes[r].idx, lt0, i0);
      _mm512_mask_store_epi32(lanes[r].idx + 16, lt1, i1);
    }
  }
}

// best_lane of every AVX-512 kernel: a vector min over the 32 lanes, then the smallest
// index among the lanes holding it. At K = 1024 the scalar loop over 32 lanes cost
// about a third as much as the tile unit's products of the row.
VQ_TARGET_512 inline void best_lane_512(const Lanes<kNr>& l, float& val, int32_t& idx) {
  const __m512 v0 = _mm512_load_ps(l.val), v1 = _mm512_load_ps(l.val + 16);
  const float best = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));  // lane scores are never NaN
  const __m512 b = _mm512_set1_ps(best);
  const __m512i none = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  const __m512i c0 = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(v0, b, _CMP_EQ_OQ), _mm512_load_si512(l.idx));
  const __m512i c1 = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(v1, b, _CMP_EQ_OQ), _mm512_load_si512(l.idx + 16));
  val = best;
  idx = _mm512_reduce_min_epi32(_mm512_min_epi32(c0, c1));
}

// What the three AVX-512 policies share: element type, panel width, the residual
// of the epilogue and the vector best-of-lanes.
template <typename TT>
struct Avx512Policy {
  using T = TT;
  static constexpr int kNr = vqkern_cpu::kNr;
  static float residual(const float* z, const float* e, int64_t d) { return residual_f32(z, e, d); }
  static float residual(const uint16_t* z, const uint16_t* e, int64_t d) { return residual_bf16(z, e, d); }
  static void best_lane(const Lanes<kNr>& l, float& val, int32_t& idx) { best_lane_512(l, val, idx); }
};

// Rows [0, rows) of a work item in blocks of 14 (and one remainder block). Block m
// (rows m .. m + MR - 1) starts at element m * width of the prepared scratch, width
// being the T elements of one prepared row.
template <class K, typename T>
void run_blocks(int64_t rows, int64_t d, int64_t width, const T* packed, const float* norms, int64_t p0, int64_t p1,
                Lanes<kNr>* lanes, const T* scratch) {
  for (int64_t m = 0; m < rows; m += kMr) {
    driver::with_rows<kMr>(static_cast<int>(std::min<int64_t>(kMr, rows - m)), [&](auto mr) {
      K::template block<decltype(mr)::value>(scratch + m * width, d, packed, norms, p0, p1, lanes + m);
    });
  }
}

// The work item's rows, each block of up to 14 d-major in its own slice of the scratch:
// row m + r's step t at zp[t * MR + r], zp = scratch + m * width (MR = the block's
// rows, width = words per row). make(row, t) is the word the kernel reads for step t
// of that row (an fp32 element, or a pair of bf16 elements).
template <typename W, class Make>
VQ_TARGET_512 void transpose_rows(int64_t rows, int64_t steps, int64_t width, W* scratch, Make&& make) {
  for (int64_t m = 0; m < rows; m += kMr) {
    const int64_t mr = std::min<int64_t>(kMr, rows - m);
    W* zp = scratch + m * width;
    for (int64_t r = 0; r < mr; ++r)
      for (int64_t t = 0; t < steps; ++t) zp[t * mr + r] = make(m + r, t);
  }
}

// ---- fp32 ---------------------------------------------------------------------------

template <int MR>
VQ_TARGET_512 void panels_f32(const float* zp, const float* packed, const float* norms, int64_t d, int64_t p0,
                              int64_t p1, Lanes<kNr>* lanes) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = packed + p * d * kNr;
    __m512 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
      acc0[r] = _mm512_setzero_ps();
      acc1[r] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < d; ++t) {
      const __m512 e0 = _mm512_load_ps(panel + t * kNr);
      const __m512 e1 = _mm512_load_ps(panel + t * kNr + 16);
      const float* zt = zp + t * MR;
      for (int r = 0; r < MR; ++r) {
        const __m512 zv = _mm512_set1_ps(zt[r]);
        acc0[r] = _mm512_fmadd_ps(zv, e0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(zv, e1, acc1[r]);
      }
    }
    fold<MR>(acc0, acc1, norms + p * kNr, static_cast<int32_t>(p * kNr), lanes);
  }
}

struct Avx512F32 : Avx512Policy<float> {
  static constexpr int64_t kRowBlock = 8 * kMr;                      // 112 rows, ~28 KB of z at D = 64
  static int64_t scratch_elems(int64_t d) { return kRowBlock * d; }  // the item's rows, transposed
  static int64_t panel_elems(int64_t d) { return d * kNr; }
  static constexpr bool kCentred = true;
  static void pack_panels(const float* cb, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                          const float* centre, float* packed, float* norms) {
    driver::pack_panels_f32<kNr>(cb, ldc, k, d, p0, p1, centre, packed, norms);
  }

  // Transposed (and centred) once per work item, not once per cache block of codes: at
  // D = 256 a cache block is only 8 panels, and a copy per block cost ~10% of the FMAs' time.
  static void prepare(const float* z0, int64_t ldz, int64_t rows, int64_t d, const float* centre, float* zp) {
    transpose_rows(rows, d, d, zp, [&](int64_t r, int64_t t) { return z0[r * ldz + t] - centre[t]; });
  }

  template <int MR>
  static void block(const float* zp, int64_t d, const float* packed, const float* norms, int64_t p0, int64_t p1,
                    Lanes<kNr>* lanes) {
    panels_f32<MR>(zp, packed, norms, d, p0, p1, lanes);
  }

  static void run_block(const float*, int64_t, int64_t rows, int64_t d, const float* packed, const float* norms,
                        int64_t p0, int64_t p1, Lanes<kNr>* lanes, float* zp) {
    run_blocks<Avx512F32>(rows, d, d, packed, norms, p0, p1, lanes, zp);
  }
};

// ---- bf16 ---------------------------------------------------------------------------
// vdpbf16ps adds, per fp32 lane, the two products of a pair of adjacent bf16 values:
// the packed panel holds pairs (e_j[2u], e_j[2u+1]) of 32 codes per d pair u, and the
// z scratch the matching pairs of 14 rows as 32-bit words. An odd d pads the last pair
// with a zero in both. Products of bf16 values are exact in fp32 and the sums are
// fp32, so this ranks as the fp32 search of the widened values would, up to the order
// of the additions (vdpbf16ps flushes bf16 subnormals, below 1.2e-38, to zero).

// Both bf16 layouts are matrices of 32-bit words W[u][j] = (e_j[2u], e_j[2u + 1]) (low half
// first), one row of words per d pair u, codes along the row: packing is a transpose of
// 32-bit words, written one whole row at a time while the code rows read stay in L1.
// pair_word gives a word (zero past d and for a padding code, e null).
inline uint32_t pair_word(const uint16_t* e, int64_t u, int64_t d) {
  if (!e) return 0;
  const int64_t t = 2 * u;
  if (t + 1 < d) {
    uint32_t w;
    std::memcpy(&w, e + t, sizeof(w));
    return w;
  }
  return t < d ? e[t] : 0;
}

// acc (16 codes) += the squares of a row of 16 words' two elements, low then high: the
// norms' fma in d order (see driver::panel_norms), 16 codes at once.
VQ_TARGET_512 inline __m512 add_pair_squares(__m512 acc, const uint32_t* words) {
  const __m512i w = _mm512_loadu_si512(words);
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  return _mm512_fmadd_ps(hi, hi, _mm512_fmadd_ps(lo, lo, acc));
}

VQ_TARGET_512 inline void store_norms(float* out, int64_t first, int64_t k, __m512 acc) {
  alignas(64) float v[16];
  _mm512_store_ps(v, acc);
  for (int j = 0; j < 16; ++j) out[j] = first + j < k ? v[j] : std::numeric_limits<float>::infinity();
}

template <int NR>
inline void code_rows(const uint16_t* codebook, int64_t ldc, int64_t k, int64_t p, const uint16_t** rows) {
  for (int j = 0; j < NR; ++j) rows[j] = p * NR + j < k ? codebook + (p * NR + j) * ldc : nullptr;
}

// Panel p: (d + 1) / 2 rows of 32 words, W[u][j] for codes 32 p + j.
VQ_TARGET_512 void pack_panels_bf16(const uint16_t* codebook, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                                    uint16_t* packed, float* norms) {
  const int64_t pairs = (d + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    uint32_t* panel = reinterpret_cast<uint32_t*>(packed + p * pairs * 2 * kNr);
    const uint16_t* rows[kNr];
    code_rows<kNr>(codebook, ldc, k, p, rows);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t u = 0; u < pairs; ++u) {
      uint32_t* row = panel + u * kNr;
      for (int j = 0; j < kNr; ++j) row[j] = pair_word(rows[j], u, d);
      acc0 = add_pair_squares(acc0, row);
      acc1 = add_pair_squares(acc1, row + 16);
    }
    store_norms(norms + p * kNr, p * kNr, k, acc0);
    store_norms(norms + p * kNr + 16, p * kNr + 16, k, acc1);
  }
}

template <int MR>
VQ_TARGET_BF16 void panels_bf16(const uint32_t* zp, const uint16_t* packed, const float* norms, int64_t pairs,
                                int64_t p0, int64_t p1, Lanes<kNr>* lanes) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = packed + p * pairs * 2 * kNr;
    __m512 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
      acc0[r] = _mm512_setzero_ps();
      acc1[r] = _mm512_setzero_ps();
    }
    for (int64_t u = 0; u < pairs; ++u) {
      const __m512bh e0 = (__m512bh)_mm512_load_si512(panel + u * 2 * kNr);
      const __m512bh e1 = (__m512bh)_mm512_load_si512(panel + u * 2 * kNr + 32);
      const uint32_t* zu = zp + u * MR;
      for (int r = 0; r < MR; ++r) {
        const __m512bh zv = (__m512bh)_mm512_set1_epi32(static_cast<int>(zu[r]));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], zv, e0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], zv, e1);
      }
    }
    fold<MR>(acc0, acc1, norms + p * kNr, static_cast<int32_t>(p * kNr), lanes);
  }
}

struct Avx512Bf16 : Avx512Policy<uint16_t> {
  static constexpr int64_t kRowBlock = 8 * kMr;
  static int64_t scratch_elems(int64_t d) { return kRowBlock * 2 * ((d + 1) / 2); }  // pairs as uint32
  static int64_t panel_elems(int64_t d) { return (d + 1) / 2 * 2 * kNr; }
  static constexpr bool kCentred = false;  // bf16 products of the inputs as they are
  static void pack_panels(const uint16_t* cb, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1, const float*,
                          uint16_t* packed, float* norms) {
    pack_panels_bf16(cb, ldc, k, d, p0, p1, packed, norms);
  }

  // A row's prepared width: its pairs as 32-bit words, 2 uint16 elements each.
  static void prepare(const uint16_t* z0, int64_t ldz, int64_t rows, int64_t d, const float*, uint16_t* scratch) {
    const int64_t pairs = (d + 1) / 2;
    transpose_rows(rows, pairs, pairs, reinterpret_cast<uint32_t*>(scratch), [&](int64_t r, int64_t u) {
      const uint16_t* z = z0 + r * ldz;
      const uint32_t lo = z[2 * u], hi = 2 * u + 1 < d ? z[2 * u + 1] : 0;
      return lo | (hi << 16);
    });
  }

  template <int MR>
  static void block(const uint16_t* scratch, int64_t d, const uint16_t* packed, const float* norms, int64_t p0,
                    int64_t p1, Lanes<kNr>* lanes) {
    panels_bf16<MR>(reinterpret_cast<const uint32_t*>(scratch), packed, norms, (d + 1) / 2, p0, p1, lanes);
  }

  static void run_block(const uint16_t*, int64_t, int64_t rows, int64_t d, const uint16_t* packed, const float* norms,
                        int64_t p0, int64_t p1, Lanes<kNr>* lanes, uint16_t* scratch) {
    run_blocks<Avx512Bf16>(rows, d, 2 * ((d + 1) / 2), packed, norms, p0, p1, lanes, scratch);
  }
};

// ---- bf16 on AMX ----------------------------------------------------------------------
// A 32-row x 32-code block per step: A tiles tmm0/tmm1 hold 16 rows x 32 bf16 of z each,
// B tiles tmm2/tmm3 16 d pairs x 16 codes (pairs adjacent, the VNNI layout of
// tdpbf16ps), C tiles tmm4-tmm7 the 32 x 32 fp32 dot products; each tdpbf16ps does
// 16 x 16 x 32 products, exact in fp32, summed in fp32. d is cut into chunks of 32,
// z rows and codes zero-padded to a whole chunk. The C tiles go to a 4 KB buffer in
// L1 and are folded into the lane state by fold<16, true>: at small d that fold, not
// the tile unit, bounds the rate. Folding two panels' products together (64 codes,
// half the lane state's stores) was measured 0.86-0.94x of this (benchmarks/NOTES.md).

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline int64_t amx_chunks(int64_t d) { return (d + 31) / 32; }

// Panel p, chunk c, half h (codes 16h..16h+15): a 16 x 32 bf16 B tile, row u holding
// (e_j[32c + 2u], e_j[32c + 2u + 1]) for j = 0..15, i.e. the words W[16c + u][16h + j].
VQ_TARGET_512 void pack_panels_amx(const uint16_t* codebook, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1,
                                   uint16_t* packed, float* norms) {
  const int64_t chunks = amx_chunks(d);
  for (int64_t p = p0; p < p1; ++p) {
    uint32_t* panel = reinterpret_cast<uint32_t*>(packed + p * chunks * 1024);
    const uint16_t* rows[kNr];
    code_rows<kNr>(codebook, ldc, k, p, rows);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < chunks; ++c)
      for (int h = 0; h < 2; ++h) {
        uint32_t* tile = panel + (c * 2 + h) * 256;
        for (int u = 0; u < 16; ++u) {
          for (int j = 0; j < 16; ++j) tile[u * 16 + j] = pair_word(rows[16 * h + j], 16 * c + u, d);
          acc[h] = add_pair_squares(acc[h], tile + u * 16);
        }
      }
    store_norms(norms + p * kNr, p * kNr, k, acc[0]);
    store_norms(norms + p * kNr + 16, p * kNr + 16, k, acc[1]);
  }
}

#define VQ_TARGET_AMX __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,amx-tile,amx-bf16")))

VQ_TARGET_AMX void panels_amx(const uint16_t* zp, int64_t zstride_bytes, int64_t chunks, const uint16_t* packed,
                              const float* norms, int64_t p0, int64_t p1, Lanes<kNr>* lanes, float* cbuf) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = packed + p * chunks * 1024;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(0, zp + c * 32, zstride_bytes);
      _tile_loadd(1, zp + 16 * (zstride_bytes / 2) + c * 32, zstride_bytes);
      _tile_loadd(2, panel + c * 1024, 64);
      _tile_loadd(3, panel + c * 1024 + 512, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
    // cbuf row r (of 32): codes 0-15 then 16-31.
    _tile_stored(4, cbuf, 128);
    _tile_stored(5, cbuf + 16, 128);
    _tile_stored(6, cbuf + 16 * 32, 128);
    _tile_stored(7, cbuf + 16 * 32 + 16, 128);
    for (int half = 0; half < 2; ++half) {
      __m512 acc0[16], acc1[16];
      for (int r = 0; r < 16; ++r) {
        acc0[r] = _mm512_load_ps(cbuf + (half * 16 + r) * 32);
        acc1[r] = _mm512_load_ps(cbuf + (half * 16 + r) * 32 + 16);
      }
      fold<16, true>(acc0, acc1, norms + p * kNr, static_cast<int32_t>(p * kNr), lanes + half * 16);
    }
  }
}

// Eight tiles of 16 rows x 64 bytes. A static object, not a local: GCC 12's
// _tile_loadconfig tells the compiler it reads only the first byte, so the stores
// that fill a local config were dropped and the first tile instruction faulted.
alignas(64) const TileConfig kTileConfig = [] {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}();

VQ_TARGET_AMX void amx_configure() { _tile_loadconfig(&kTileConfig); }

VQ_TARGET_AMX void amx_release() { _tile_release(); }

struct AmxBf16 : Avx512Policy<uint16_t> {
  static constexpr int64_t kRowBlock = 4 * kAmxRows;  // 128 rows, 16 KB of z at D = 64
  // The row block's z, padded to whole chunks, then the 4 KB C buffer.
  static int64_t scratch_elems(int64_t d) { return kRowBlock * amx_chunks(d) * 32 + 2048 + 32; }
  static int64_t panel_elems(int64_t d) { return amx_chunks(d) * 1024; }
  static constexpr bool kCentred = false;  // bf16 products of the inputs as they are
  static void pack_panels(const uint16_t* cb, int64_t ldc, int64_t k, int64_t d, int64_t p0, int64_t p1, const float*,
                          uint16_t* packed, float* norms) {
    pack_panels_amx(cb, ldc, k, d, p0, p1, packed, norms);
  }

  // Rows past `rows` (to a multiple of 32) are zero and fold into lane slots that the
  // driver never reads (it sizes the lane state for kRowBlock rows).
  static void prepare(const uint16_t* z0, int64_t ldz, int64_t rows, int64_t d, const float*, uint16_t* scratch) {
    const int64_t width = amx_chunks(d) * 32;
    const int64_t groups = (rows + kAmxRows - 1) / kAmxRows;
    for (int64_t r = 0; r < groups * kAmxRows; ++r) {
      uint16_t* out = scratch + r * width;
      const int64_t have = r < rows ? d : 0;
      if (have) std::memcpy(out, z0 + r * ldz, static_cast<size_t>(d) * sizeof(uint16_t));
      std::memset(out + have, 0, static_cast<size_t>(width - have) * sizeof(uint16_t));
    }
  }

  static void run_block(const uint16_t*, int64_t, int64_t rows, int64_t d, const uint16_t* packed, const float* norms,
                        int64_t p0, int64_t p1, Lanes<kNr>* lanes, uint16_t* scratch) {
    const int64_t chunks = amx_chunks(d), width = chunks * 32;
    const int64_t groups = (rows + kAmxRows - 1) / kAmxRows;
    // The C buffer follows the row block's z; the scratch is this thread's alone.
    float* cbuf = reinterpret_cast<float*>(scratch + ((kRowBlock * width + 31) / 32) * 32);
    amx_configure();
    for (int64_t g = 0; g < groups; ++g)
      panels_amx(scratch + g * kAmxRows * width, width * 2, chunks, packed, norms, p0, p1, lanes + g * kAmxRows, cbuf);
    amx_release();
  }
};

}  // namespace

void search_f32_avx512(const driver::Problem<float>& pb, int threads) { driver::search<Avx512F32>(pb, threads); }
void search_bf16_avx512(const driver::Problem<uint16_t>& pb, int threads) { driver::search<Avx512Bf16>(pb, threads); }
void search_bf16_amx(const driver::Problem<uint16_t>& pb, int threads) { driver::search<AmxBf16>(pb, threads); }
SearchTiles tiles_f32_avx512() { return driver::tiles<Avx512F32>(); }
SearchTiles tiles_bf16_avx512() { return driver::tiles<Avx512Bf16>(); }
SearchTiles tiles_bf16_amx() { return driver::tiles<AmxBf16>(); }

}  // namespace vqkern_cpu
