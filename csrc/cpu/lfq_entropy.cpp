// LFQ's entropy terms on the CPU, exact and streamed (vqkern/lfq_entropy.py has the math).
//
// A row's distribution over the 2^d codes is p(h, l) = P_H[h] * P_L[l]: h the high
// d/2 bits, l the low ones, each table a product of per-bit sigmoids built by doubling
// (and its log, a sum of log-sigmoids: one sign, no cancellation). So
//   - the batch sum of the distributions is sum_i P_H,i^T P_L,i: each thread owns a
//     range of (codebook, h) rows of the (c, 2^d) sum and adds, row after row in order,
//     P_H,i[h] * P_L,i into them, a block of h rows at a time so that block stays in
//     cache. Every element is the same chain of fmas in row order whatever the thread
//     count or blocking: bitwise reproducible;
//   - each row's entropy -sum_h P_H[h] sum_l P_L[l] max(log P_H[h] + log P_L[l], log eps)
//     and the backward are O(2^d) per row, rows shared out between threads.
// Entries of P_H that underflow to exactly 0 contribute exactly 0 to every sum (P_L
// is finite), so they are skipped: with the usual inverse temperature of 100 most
// bits are certain and a row has few nonzero P_H entries, and the work per row falls
// from 2^d towards (nonzero entries) x 2^(d/2) with the same result. A NaN in a row
// makes P_H NaN (never skipped) or P_L NaN, so its entropy, and the loss, stay NaN.
#include "lfq_entropy.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "search.h"

namespace vqkern_cpu {
namespace {

struct Split {
  int dh, dl;
  int64_t H, L;
};

Split split_bits(int d) {
  const int dh = d / 2;
  return {dh, d - dh, int64_t(1) << dh, int64_t(1) << (d - dh)};
}

// sigmoid(-a), sigmoid(a) and their logs from one exp and one log1p: with e = exp(-|a|),
// sigmoid(|a|) = 1 / (1 + e), sigmoid(-|a|) = e / (1 + e) (never 1 - sigmoid(|a|), which
// cancels), log sigmoid(+-a) = min(+-a, 0) - log1p(e), finite for every finite a.
struct BitFactors {
  float p0, p1, l0, l1;
  explicit BitFactors(float a) {
    const float e = std::exp(-std::fabs(a)), big = 1.f / (1.f + e), small = e * big, soft = std::log1p(e);
    const bool pos = a >= 0.f;
    p1 = pos ? big : small;
    p0 = pos ? small : big;
    l1 = std::min(a, 0.f) - soft;
    l0 = std::min(-a, 0.f) - soft;
  }
};

// prob[t] and logp[t] (t < 2^bits) over the logits a[0..bits), the first bit the most
// significant: doubling in place from the top, so each source is read before it is
// overwritten.
void half_table(const float* a, int bits, float* prob, float* logp) {
  prob[0] = 1.f;
  logp[0] = 0.f;
  int64_t size = 1;
  for (int j = 0; j < bits; ++j) {
    const BitFactors f(a[j]);
    for (int64_t t = size - 1; t >= 0; --t) {
      const float p = prob[t], l = logp[t];
      prob[2 * t] = p * f.p0;
      prob[2 * t + 1] = p * f.p1;
      logp[2 * t] = l + f.l0;
      logp[2 * t + 1] = l + f.l1;
    }
    size *= 2;
  }
}

struct RowTables {
  std::vector<float> a, ph, lh, pl, ll;
  explicit RowTables(int d, const Split& s) : a(d), ph(s.H), lh(s.H), pl(s.L), ll(s.L) {}
  void build(const float* x, int d, float scale, const Split& s) {
    for (int j = 0; j < d; ++j) a[j] = x[j] * scale;
    half_table(a.data(), s.dh, ph.data(), lh.data());
    half_table(a.data() + s.dh, s.dl, pl.data(), ll.data());
  }
};

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_l pl[l] * max(lh + ll[l], log_eps). max(log_eps, t) in that operand order: a NaN
// t is kept (maxps returns its second operand when one is NaN).
__attribute__((target("avx2,fma"))) float clamped_dot(const float* pl, const float* ll, float lh, float log_eps,
                                                      int64_t L) {
  int64_t l = 0;
  float s = 0.f;
  if (L >= 8) {
    const __m256 vlh = _mm256_set1_ps(lh), vle = _mm256_set1_ps(log_eps);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; l + 16 <= L; l += 16) {
      const __m256 t0 = _mm256_add_ps(vlh, _mm256_loadu_ps(ll + l));
      const __m256 t1 = _mm256_add_ps(vlh, _mm256_loadu_ps(ll + l + 8));
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pl + l), _mm256_max_ps(vle, t0), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pl + l + 8), _mm256_max_ps(vle, t1), acc1);
    }
    for (; l + 8 <= L; l += 8) {
      const __m256 t0 = _mm256_add_ps(vlh, _mm256_loadu_ps(ll + l));
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pl + l), _mm256_max_ps(vle, t0), acc0);
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
  }
  for (; l < L; ++l) s = std::fma(pl[l], std::max(log_eps, ll[l] + lh), s);
  return s;
}

// y[l] = fma(p, x[l], y[l]): the same rounding in the vector body and the tail.
__attribute__((target("avx2,fma"))) void axpy(float p, const float* x, float* y, int64_t L) {
  int64_t l = 0;
  const __m256 vp = _mm256_set1_ps(p);
  for (; l + 8 <= L; l += 8)
    _mm256_storeu_ps(y + l, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x + l), _mm256_loadu_ps(y + l)));
  for (; l < L; ++l) y[l] = std::fma(p, x[l], y[l]);
}

float row_entropy(const RowTables& r, const Split& s, float log_eps) {
  double total = 0.0;
  for (int64_t h = 0; h < s.H; ++h) {
    const float p = r.ph[h];
    if (p == 0.f) continue;
    total += double(p) * clamped_dot(r.pl.data(), r.ll.data(), r.lh[h], log_eps, s.L);
  }
  return static_cast<float>(-total);
}

// For one h: W(l) = g[l] - ge * (max(t, log eps) + [t >= log eps]), t = lh + ll[l]
// (g null: 0); returns sum_l pl[l] W(l) and adds p * W(l) into rl[l].
__attribute__((target("avx2,fma"))) float row_weights(const float* pl, const float* ll, float lh, float log_eps,
                                                      float ge, const float* g, float p, float* rl, int64_t L) {
  int64_t l = 0;
  float s = 0.f;
  if (L >= 8) {
    const __m256 vlh = _mm256_set1_ps(lh), vle = _mm256_set1_ps(log_eps), vge = _mm256_set1_ps(ge);
    const __m256 vp = _mm256_set1_ps(p), one = _mm256_set1_ps(1.f);
    __m256 acc = _mm256_setzero_ps();
    for (; l + 8 <= L; l += 8) {
      const __m256 t = _mm256_add_ps(vlh, _mm256_loadu_ps(ll + l));
      const __m256 w = _mm256_add_ps(_mm256_max_ps(vle, t), _mm256_and_ps(_mm256_cmp_ps(t, vle, _CMP_GE_OQ), one));
      const __m256 gw = g ? _mm256_loadu_ps(g + l) : _mm256_setzero_ps();
      const __m256 W = _mm256_fnmadd_ps(vge, w, gw);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(pl + l), W, acc);
      _mm256_storeu_ps(rl + l, _mm256_fmadd_ps(vp, W, _mm256_loadu_ps(rl + l)));
    }
    s = hsum(acc);
  }
  for (; l < L; ++l) {
    const float t = lh + ll[l];
    const float w = std::max(log_eps, t) + (t >= log_eps ? 1.f : 0.f);
    const float W = std::fma(-ge, w, g ? g[l] : 0.f);
    s = std::fma(pl[l], W, s);
    rl[l] = std::fma(p, W, rl[l]);
  }
  return s;
}

void check_args(int d, const char* name) {
  if (d < 1 || d > kLfqMaxBits)
    throw std::invalid_argument(std::string("vqkern._cpu.") + name + ": d must lie in [1, 24], got " +
                                std::to_string(d));
  if (!supported()) throw std::runtime_error(std::string("vqkern._cpu.") + name + " needs a CPU with AVX2 and FMA");
}

// What both passes set up: the split, log eps, the rows (n * c) and the threads to use
// (below ~64K (row, code) pairs per thread a thread costs more to start than it saves).
struct Setup {
  Split s;
  float log_eps;
  int64_t rows;
  int threads;
  Setup(int64_t n, int64_t c, int d, float eps, int max_threads)
      : s(split_bits(d)), log_eps(std::log(eps)), rows(n * c) {
    const int64_t work = rows * s.H * s.L;
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({max_threads, rows, work / 65536 + 1})));
  }
};

}  // namespace

void lfq_entropy_forward(const float* x, int64_t n, int64_t c, int d, float scale, float eps, float* entropy,
                         float* prob_sum, int threads) {
  check_args(d, "lfq_entropy");
  if (n <= 0 || c <= 0) return;
  const Setup setup(n, c, d, eps, threads);
  const Split& s = setup.s;
  const float log_eps = setup.log_eps;
  const int64_t rows = setup.rows;
  const int tr = setup.threads;

  // Per-row entropies: contiguous row ranges.
  parallel_for_threads(tr, [&](int t) {
    RowTables r(d, s);
    for (int64_t i = rows * t / tr; i < rows * (t + 1) / tr; ++i) {
      r.build(x + i * d, d, scale, s);
      entropy[i] = row_entropy(r, s, log_eps);
    }
  });

  // Sums: thread t owns the (codebook, h) rows [q0, q1) of prob_sum viewed as (c * H, L).
  // 64 data rows' tables at a time, and blocks of h rows of about 64 KB, which stay in
  // L2 while the rows' P_L go past.
  constexpr int64_t kChunk = 64;
  const int64_t block = std::max<int64_t>(1, 16384 / s.L);
  const int64_t qn = c * s.H;
  const int tq = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tr, qn)));
  parallel_for_threads(tq, [&](int t) {
    const int64_t q0 = qn * t / tq, q1 = qn * (t + 1) / tq;
    RowTables r(d, s);
    std::vector<float> ph(kChunk * s.H), pl(kChunk * s.L);
    for (int64_t ci = q0 / s.H; ci <= (q1 - 1) / s.H; ++ci) {
      const int64_t h0 = std::max<int64_t>(q0 - ci * s.H, 0), h1 = std::min<int64_t>(q1 - ci * s.H, s.H);
      float* out = prob_sum + ci * s.H * s.L;
      for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t m = std::min<int64_t>(kChunk, n - i0);
        for (int64_t k = 0; k < m; ++k) {
          r.build(x + ((i0 + k) * c + ci) * d, d, scale, s);
          std::copy(r.ph.begin(), r.ph.end(), ph.begin() + k * s.H);
          std::copy(r.pl.begin(), r.pl.end(), pl.begin() + k * s.L);
        }
        for (int64_t b0 = h0; b0 < h1; b0 += block) {
          const int64_t b1 = std::min(b0 + block, h1);
          for (int64_t k = 0; k < m; ++k)
            for (int64_t h = b0; h < b1; ++h) {
              const float p = ph[k * s.H + h];
              if (p != 0.f) axpy(p, pl.data() + k * s.L, out + h * s.L, s.L);
            }
        }
      }
    }
  });
}

void lfq_entropy_backward(const float* x, int64_t n, int64_t c, int d, float scale, float eps,
                          const float* grad_entropy, const float* grad_prob_sum, float* grad_x, int threads) {
  check_args(d, "lfq_entropy_backward");
  if (n <= 0 || c <= 0) return;
  const Setup setup(n, c, d, eps, threads);
  const Split& s = setup.s;
  const float log_eps = setup.log_eps;
  const int64_t rows = setup.rows;
  const int tr = setup.threads;
  parallel_for_threads(tr, [&](int t) {
    RowTables r(d, s);
    std::vector<float> rl(s.L);
    std::vector<double> t1(d), t0(d);
    for (int64_t i = rows * t / tr; i < rows * (t + 1) / tr; ++i) {
      const float ge = grad_entropy ? grad_entropy[i] : 0.f;
      const float* g = grad_prob_sum ? grad_prob_sum + (i % c) * s.H * s.L : nullptr;
      r.build(x + i * d, d, scale, s);
      std::fill(rl.begin(), rl.end(), 0.f);
      std::fill(t1.begin(), t1.end(), 0.0);
      std::fill(t0.begin(), t0.end(), 0.0);
      for (int64_t h = 0; h < s.H; ++h) {
        const float p = r.ph[h];
        if (p == 0.f) continue;
        const double zh = double(p) * row_weights(r.pl.data(), r.ll.data(), r.lh[h], log_eps, ge,
                                                  g ? g + h * s.L : nullptr, p, rl.data(), s.L);
        for (int j = 0; j < s.dh; ++j) ((h >> (s.dh - 1 - j)) & 1 ? t1 : t0)[j] += zh;
      }
      for (int64_t l = 0; l < s.L; ++l) {
        const double zl = double(r.pl[l]) * rl[l];
        for (int j = 0; j < s.dl; ++j) ((l >> (s.dl - 1 - j)) & 1 ? t1 : t0)[s.dh + j] += zl;
      }
      for (int j = 0; j < d; ++j) {
        const BitFactors f(r.a[j]);
        grad_x[i * d + j] = static_cast<float>(scale * (f.p0 * t1[j] - f.p1 * t0[j]));
      }
    }
  });
}

}  // namespace vqkern_cpu
