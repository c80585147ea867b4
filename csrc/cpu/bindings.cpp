// pybind11 module vqkern._cpu: the fused CPU search behind the "torch" backend on
// CPU tensors. Python passes data pointers as ints (tensor.data_ptr()), so no
// PyTorch header is needed; inputs are validated in vqkern.functional and the
// shapes and strides checked again in vqkern.backends.torch_.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "search.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "vqkern CPU kernels (fp32 data pointers, shapes, row strides)";
  m.def("supported", &vqkern_cpu::supported, "True when this CPU has AVX2 and FMA.");
  m.def("search_l2",
        [](std::uintptr_t z, int64_t n, int64_t ldz, std::uintptr_t codebook, int64_t k,
           int64_t ldc, int64_t d, std::uintptr_t indices, std::uintptr_t distances,
           std::uintptr_t quantized, int64_t ldq, int threads) {
          py::gil_scoped_release release;
          vqkern_cpu::search_l2(reinterpret_cast<const float*>(z), n, ldz,
                                reinterpret_cast<const float*>(codebook), k, ldc, d,
                                reinterpret_cast<int64_t*>(indices),
                                reinterpret_cast<float*>(distances),
                                reinterpret_cast<float*>(quantized), ldq, threads);
        },
        py::arg("z"), py::arg("n"), py::arg("ldz"), py::arg("codebook"), py::arg("k"),
        py::arg("ldc"), py::arg("d"), py::arg("indices"), py::arg("distances"),
        py::arg("quantized"), py::arg("ldq"), py::arg("threads"),
        "indices (n,) int64 = nearest code of each fp32 row of z, lowest index on ties; "
        "distances (n,) fp32 and quantized (n, d) fp32 written too unless their pointer is 0.");
}
