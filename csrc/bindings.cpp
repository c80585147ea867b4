// pybind11 module vqkern._C: the CUDA kernels behind the "cuda" backend.
// Python passes device pointers and the stream handle as ints
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), so no PyTorch
// header is needed and the binary does not depend on one PyTorch release.
// Inputs are validated once in vqkern.functional / vqkern.backends.cuda.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "vqkern.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vqkern._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Launch on the tensors' device whatever this thread's current device is, and
// put the caller's current device back afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = device != previous_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);  // best effort: a destructor must not throw
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqkern CUDA kernels (device pointers, shapes, dtype codes 0=f32 1=f16 2=bf16, stream)";
  m.attr("SEARCH_ROWS") = vqkern::kSearchRows;
  m.attr("SEGMENT_CHUNK_ROWS") = vqkern::kSegmentChunkRows;
  m.attr("CUDA_VERSION") = CUDART_VERSION;

  m.def(
      "probe",
      [](int device) {
        DeviceGuard guard(device);
        return vqkern::probe();
      },
      py::arg("device"), "Raise unless the kernels can run on `device`; describe their image.");

  m.def(
      "search",
      [](int device, std::uintptr_t z, int z_dtype, std::uintptr_t codebook, int cb_dtype, int64_t n, int64_t k,
         int64_t d, std::uintptr_t centre, std::uintptr_t norms, std::uintptr_t part_scores, std::uintptr_t part_index,
         int splits, bool use_tensor_cores, std::uintptr_t indices, std::uintptr_t distances, std::uintptr_t quantized,
         std::uintptr_t stream) {
        DeviceGuard guard(device);
        vqkern::search(ptr<const void>(z), z_dtype, ptr<const void>(codebook), cb_dtype, n, k, d,
                       ptr<const float>(centre), ptr<float>(norms), ptr<float>(part_scores), ptr<int32_t>(part_index),
                       splits, use_tensor_cores, ptr<int64_t>(indices), ptr<float>(distances), ptr<void>(quantized),
                       stream_of(stream));
      },
      py::arg("device"), py::arg("z"), py::arg("z_dtype"), py::arg("codebook"), py::arg("cb_dtype"), py::arg("n"),
      py::arg("k"), py::arg("d"), py::arg("centre"), py::arg("norms"), py::arg("part_scores"), py::arg("part_index"),
      py::arg("splits"), py::arg("use_tensor_cores"), py::arg("indices"), py::arg("distances"), py::arg("quantized"),
      py::arg("stream"),
      "Nearest code per row; centre (d,) f32 (the fp32 kernel's frame; 0 for the tensor-core kernel); "
      "workspaces norms (k,) f32, part_scores/part_index (splits, n) f32/i32.");

  m.def(
      "backward",
      [](int device, std::uintptr_t grad_q, int g_dtype, std::uintptr_t z, int z_dtype, std::uintptr_t codebook,
         int cb_dtype, std::uintptr_t indices, int64_t n, int64_t d, std::uintptr_t scale, std::uintptr_t grad_z,
         std::uintptr_t diff_sums, std::uintptr_t stream) {
        DeviceGuard guard(device);
        vqkern::backward(ptr<const void>(grad_q), g_dtype, ptr<const void>(z), z_dtype, ptr<const void>(codebook),
                         cb_dtype, ptr<const int64_t>(indices), n, d, ptr<const float>(scale), ptr<void>(grad_z),
                         ptr<float>(diff_sums), stream_of(stream));
      },
      py::arg("device"), py::arg("grad_q"), py::arg("g_dtype"), py::arg("z"), py::arg("z_dtype"), py::arg("codebook"),
      py::arg("cb_dtype"), py::arg("indices"), py::arg("n"), py::arg("d"), py::arg("scale"), py::arg("grad_z"),
      py::arg("diff_sums"), py::arg("stream"),
      "One pass: grad_z = grad_q - *scale * (e - z) (0 skips it), diff_sums[idx] += e - z "
      "with atomics (0 skips it); scale is a device pointer to one fp32.");

  m.def(
      "segment_sum_atomic",
      [](int device, std::uintptr_t indices, std::uintptr_t values, int v_dtype, int64_t n, int64_t d,
         std::uintptr_t counts, std::uintptr_t sums, std::uintptr_t stream) {
        DeviceGuard guard(device);
        vqkern::segment_sum_atomic(ptr<const int64_t>(indices), ptr<const void>(values), v_dtype, n, d,
                                   ptr<float>(counts), ptr<float>(sums), stream_of(stream));
      },
      py::arg("device"), py::arg("indices"), py::arg("values"), py::arg("v_dtype"), py::arg("n"), py::arg("d"),
      py::arg("counts"), py::arg("sums"), py::arg("stream"),
      "counts/sums (fp32) += per-code count and sum of values, with atomics.");

  m.def(
      "segment_sum_sorted",
      [](int device, std::uintptr_t sorted_idx, std::uintptr_t perm, std::uintptr_t values, int v_dtype,
         std::uintptr_t base, int base_dtype, int64_t n, int64_t d, int64_t k, std::uintptr_t counts,
         std::uintptr_t sums, std::uintptr_t partial, std::uintptr_t stream) {
        DeviceGuard guard(device);
        vqkern::segment_sum_sorted(ptr<const int64_t>(sorted_idx), ptr<const int64_t>(perm), ptr<const void>(values),
                                   v_dtype, ptr<const void>(base), base_dtype, n, d, k, ptr<float>(counts),
                                   ptr<float>(sums), ptr<float>(partial), stream_of(stream));
      },
      py::arg("device"), py::arg("sorted_idx"), py::arg("perm"), py::arg("values"), py::arg("v_dtype"), py::arg("base"),
      py::arg("base_dtype"), py::arg("n"), py::arg("d"), py::arg("k"), py::arg("counts"), py::arg("sums"),
      py::arg("partial"), py::arg("stream"),
      "Deterministic segment sum over rows sorted by code (stable sort: sorted_idx, perm); "
      "base (0 = none) sums base[code] - values instead; counts 0 = not counted.");
}
