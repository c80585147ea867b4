// Aligned buffers of the CPU kernels, and buffers a calling thread keeps between calls.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace vqkern_cpu {
namespace buffers {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T, AlignedFree> aligned_array(size_t count) {
  const size_t bytes = (std::max<size_t>(count, 1) * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T, AlignedFree>(p);
}

// A 64-byte aligned buffer that a calling thread keeps from one call to the next, for
// the packed codebook and the backward's piece sums: a fresh 16 MB buffer costs its
// page faults on every call (3284 minor faults, ~10 ms on the Xeon VM of
// benchmarks/NOTES.md, as long as searching 32 rows against those 16384 x 256 codes).
// At most kKeepBytes stay allocated per calling thread and kernel; a larger request is
// served by a buffer of its own, freed when the call ends.
constexpr size_t kKeepBytes = size_t(64) << 20;

struct KeptBuffer {
  std::unique_ptr<unsigned char, AlignedFree> data;
  size_t bytes = 0;
};

template <typename T>
T* kept_array(KeptBuffer& kept, std::unique_ptr<unsigned char, AlignedFree>& own, size_t count) {
  const size_t bytes = (std::max<size_t>(count, 1) * sizeof(T) + 63) / 64 * 64;
  if (bytes > kKeepBytes) {
    own = aligned_array<unsigned char>(bytes);
    return reinterpret_cast<T*>(own.get());
  }
  if (bytes > kept.bytes) {
    kept.data.reset();  // before allocating the larger one: never both at once
    kept.bytes = 0;
    kept.data = aligned_array<unsigned char>(bytes);
    kept.bytes = bytes;
  }
  return reinterpret_cast<T*>(kept.data.get());
}

}  // namespace buffers
}  // namespace vqkern_cpu
