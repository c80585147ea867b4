// pybind11 module vqkern._cpu: the fused CPU search and backward behind the "torch"
// backend on CPU tensors. Python passes data pointers as ints (tensor.data_ptr()), so
// no PyTorch header is needed; inputs are validated in vqkern.functional and the
// shapes and strides checked again in vqkern.backends.torch_.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lfq_entropy.h"
#include "search.h"

namespace py = pybind11;
using namespace vqkern_cpu;

namespace {

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (int i = 0; i < kIsaCount; ++i)
    if (name == isa_name(static_cast<Isa>(i))) return static_cast<Isa>(i);
  throw std::invalid_argument("vqkern._cpu: unknown isa " + name + " (avx2, avx512, avx512bf16, amx or auto)");
}

}  // namespace

// One binding for both row types: pointers arrive as ints (tensor.data_ptr()), and the
// search runs without the GIL.
template <typename T, void (*Search)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, int64_t*, float*,
                                     T*, int64_t, int, Isa)>
void bind_search(std::uintptr_t z, int64_t n, int64_t ldz, std::uintptr_t codebook, int64_t k, int64_t ldc, int64_t d,
                 std::uintptr_t indices, std::uintptr_t distances, std::uintptr_t quantized, int64_t ldq, int threads,
                 const std::string& isa) {
  const Isa path = parse_isa(isa);
  py::gil_scoped_release release;
  Search(reinterpret_cast<const T*>(z), n, ldz, reinterpret_cast<const T*>(codebook), k, ldc, d,
         reinterpret_cast<int64_t*>(indices), reinterpret_cast<float*>(distances), reinterpret_cast<T*>(quantized), ldq,
         threads, path);
}

template <typename T, void (*Search)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, int64_t*, float*,
                                     T*, int64_t, int, Isa)>
void def_search(py::module_& m, const char* name, const char* doc) {
  m.def(name, &bind_search<T, Search>, py::arg("z"), py::arg("n"), py::arg("ldz"), py::arg("codebook"), py::arg("k"),
        py::arg("ldc"), py::arg("d"), py::arg("indices"), py::arg("distances"), py::arg("quantized"), py::arg("ldq"),
        py::arg("threads"), py::arg("isa") = "auto", doc);
}

template <typename T, void (*Backward)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, float,
                                       T*, float*, bool, int)>
void def_backward(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](std::uintptr_t gq, std::uintptr_t z, std::uintptr_t codebook, std::uintptr_t idx, int64_t n, int64_t d,
         int64_t k, float scale, std::uintptr_t grad_z, std::uintptr_t diff_sums, bool deterministic, int threads) {
        py::gil_scoped_release release;
        Backward(reinterpret_cast<const T*>(gq), reinterpret_cast<const T*>(z), reinterpret_cast<const T*>(codebook),
                 reinterpret_cast<const int64_t*>(idx), n, d, k, scale, reinterpret_cast<T*>(grad_z),
                 reinterpret_cast<float*>(diff_sums), deterministic, threads);
      },
      py::arg("gq"), py::arg("z"), py::arg("codebook"), py::arg("idx"), py::arg("n"), py::arg("d"), py::arg("k"),
      py::arg("scale"), py::arg("grad_z"), py::arg("diff_sums"), py::arg("deterministic"), py::arg("threads"), doc);
}

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "vqkern CPU kernels (data pointers, shapes, row strides)";
  m.attr("BACKWARD_PIECE_ROWS") = kBackwardPieceRows;
  m.def("supported", &supported, "True when this CPU has AVX2 and FMA (every kernel needs them).");
  m.def(
      "isas",
      [] {
        py::list out;
        for (int i = 0; i < kIsaCount; ++i) out.append(isa_name(static_cast<Isa>(i)));
        return out;
      },
      "The kernel paths, in increasing order of what they need.");
  m.def(
      "isa_missing", [](const std::string& name) { return isa_missing(parse_isa(name)); }, py::arg("isa"),
      "'' when this CPU and OS can run the path, else the instructions or OS support it lacks.");
  m.def(
      "search_tiles",
      [](const std::string& isa, bool bf16) {
        const SearchTiles t = search_tiles(parse_isa(isa), bf16);
        return py::make_tuple(t.row_block, t.panel_codes, t.min_split_codes);
      },
      py::arg("isa"), py::arg("bf16"),
      "(rows per work item, codes per packed panel, fewest codes per split of the codes) of the kernel that "
      "search_l2 (bf16 False) or search_l2_bf16 (True) runs for isa.");
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); }, "The best path this machine can run.");
  m.def(
      "threading",
      [] {
#ifdef _OPENMP
        return std::string("OpenMP");
#else
        return std::string("std::thread");
#endif
      },
      "How the kernels run in parallel: 'OpenMP' (the runtime PyTorch's CPU ops use) or 'std::thread'.");
  def_search<float, search_l2>(m, "search_l2",
                               "indices (n,) int64 = nearest code of each fp32 row of z, lowest index on ties; "
                               "distances (n,) fp32 and quantized (n, d) fp32 written too unless their pointer is 0. "
                               "isa: avx2 or avx512 (avx512bf16 and amx run avx512), auto = the best this CPU runs.");
  def_search<uint16_t, search_l2_bf16>(
      m, "search_l2_bf16",
      "As search_l2 for bf16 z and codebook (bf16 products, fp32 sums): distances fp32, quantized bf16. "
      "isa: amx (tdpbf16ps tiles) or avx512bf16 (vdpbf16ps); auto = the best this CPU runs.");
  def_backward<float, backward_l2>(
      m, "backward_l2",
      "fp32 contiguous: grad_z (n, d) = gq + scale * (z - codebook[idx]) unless grad_z is 0; "
      "diff_sums (k, d, zero-filled) += per-code sums of codebook[idx] - z unless diff_sums is 0. "
      "Bitwise reproducible for any thread count; IndexError before any write if an index is outside [0, k).");
  def_backward<uint16_t, backward_l2_bf16>(
      m, "backward_l2_bf16",
      "As backward_l2 for bf16 gq, z, codebook and grad_z (fp32 arithmetic, grad_z rounded once); "
      "diff_sums fp32.");
  m.def(
      "lfq_entropy",
      [](std::uintptr_t x, int64_t n, int64_t c, int d, float scale, float eps, std::uintptr_t entropy,
         std::uintptr_t prob_sum, int threads) {
        py::gil_scoped_release release;
        lfq_entropy_forward(reinterpret_cast<const float*>(x), n, c, d, scale, eps, reinterpret_cast<float*>(entropy),
                            reinterpret_cast<float*>(prob_sum), threads);
      },
      py::arg("x"), py::arg("n"), py::arg("c"), py::arg("d"), py::arg("scale"), py::arg("eps"), py::arg("entropy"),
      py::arg("prob_sum"), py::arg("threads"),
      "LFQ entropy terms of fp32 x (n, c, d), per-bit logit scale * x: entropy (n, c) written, "
      "prob_sum (c, 2^d, zero-filled) += the sum of the rows' code distributions.");
  m.def(
      "lfq_entropy_backward",
      [](std::uintptr_t x, int64_t n, int64_t c, int d, float scale, float eps, std::uintptr_t grad_entropy,
         std::uintptr_t grad_prob_sum, std::uintptr_t grad_x, int threads) {
        py::gil_scoped_release release;
        lfq_entropy_backward(reinterpret_cast<const float*>(x), n, c, d, scale, eps,
                             reinterpret_cast<const float*>(grad_entropy),
                             reinterpret_cast<const float*>(grad_prob_sum), reinterpret_cast<float*>(grad_x), threads);
      },
      py::arg("x"), py::arg("n"), py::arg("c"), py::arg("d"), py::arg("scale"), py::arg("eps"), py::arg("grad_entropy"),
      py::arg("grad_prob_sum"), py::arg("grad_x"), py::arg("threads"),
      "grad_x (n, c, d) fp32 of lfq_entropy from the gradients of entropy (n, c) and prob_sum (c, 2^d) "
      "(pointer 0: zero).");
}
