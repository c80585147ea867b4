// LFQ's entropy terms on the CPU (plain C++, no PyTorch headers): see lfq_entropy.cpp.
#pragma once

#include <cstdint>

namespace vqkern_cpu {

constexpr int kLfqMaxBits = 24;

// x (n, c, d) fp32 contiguous: n rows for each of c codebooks of 2^d codes; the
// per-bit logit is a = scale * x. entropy (n, c) = each row's -sum_k p_k log(max(p_k, eps))
// over softmax of its 2^d code logits; prob_sum (c, 2^d), zero-filled by the caller,
// += the sum over rows of each row's distribution (code index: the first feature is
// the most significant bit, 1 where the code is +s). Both bitwise reproducible for any
// `threads`. Extra memory O(threads * 2^(d/2) * 64) floats. Throws std::invalid_argument
// for d outside [1, 24].
void lfq_entropy_forward(const float* x, int64_t n, int64_t c, int d, float scale, float eps, float* entropy,
                         float* prob_sum, int threads);

// grad_x (n, c, d) fp32 of a loss with gradients grad_entropy (n, c) and grad_prob_sum
// (c, 2^d) (either may be null: zero). Rows are independent: bitwise reproducible.
void lfq_entropy_backward(const float* x, int64_t n, int64_t c, int d, float scale, float eps,
                          const float* grad_entropy, const float* grad_prob_sum, float* grad_x, int threads);

}  // namespace vqkern_cpu
