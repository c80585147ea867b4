// The CPU kernels' parallel regions, on the OpenMP runtime that PyTorch's own CPU ops
// use (the libgomp.so.1 its wheel loads; this module links the same SONAME, so the
// dynamic loader gives both one runtime and one pool of worker threads).
//
// With a pool of std::threads of its own, a kernel called right after a PyTorch op
// (a zero_, a copy) found the second core still taken by PyTorch's OpenMP worker,
// which spins for a while after each parallel region before it sleeps: the kernel's
// second thread waited for it, and the one-pass backward at 16384 x 16384 x 256 took
// 7.9 ms after a zero_ against 3.3 ms with OMP_WAIT_POLICY=PASSIVE
// (benchmarks/NOTES.md). On the same pool, that spinning worker takes the kernel's
// work at once. Without OpenMP at build time, std::threads serve.
#pragma once

#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace vqkern_cpu {

// fn(t) once for each t in [0, threads), on up to `threads` threads (fewer when the
// runtime gives fewer, e.g. inside another parallel region: then a thread runs
// several t). The first exception thrown is rethrown once every call has returned.
template <typename Fn>
void parallel_for_threads(int threads, Fn&& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  std::exception_ptr error;
  std::mutex lock;
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (...) {
      std::lock_guard<std::mutex> hold(lock);
      if (!error) error = std::current_exception();
    }
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int got = omp_get_num_threads(), me = omp_get_thread_num();
    for (int t = me; t < threads; t += got) guarded(t);
  }
#else
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace vqkern_cpu
