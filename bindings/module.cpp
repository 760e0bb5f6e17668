// The private extension module kvpack._core; the public API is python/kvpack.
#include <pybind11/stl.h>

#include "args.h"
#include "arrays.h"
#include "kvpack/backend.h"
#include "kvpack/parallel.h"

namespace kvpack::bindings {
void bind_attention(py::module_& m);
void bind_clustering(py::module_& m);
void bind_compression(py::module_& m);
void bind_methods(py::module_& m);
void bind_quantization(py::module_& m);
void bind_store(py::module_& m);
}  // namespace kvpack::bindings

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  using namespace kvpack::bindings;
  m.doc() = "kvpack C++/CUDA core (private; use the kvpack package)";
  m.attr("__version__") = KVPACK_VERSION;

  m.def("cuda_compiled", &kvpack::cuda_compiled,
        "True when kvpack was built with its CUDA backend.");
  m.def("cuda_available", &kvpack::cuda_available,
        "True when the CUDA backend is built and a GPU is usable.");
  m.def("cpu_target", &kvpack::cpu_target,
        "Instruction set of the CPU kernels in use: the best build this processor runs, or the "
        "one the environment variable KVPACK_CPU_TARGET names ('native' and 'default' for a "
        "build of one target).");
  m.def("cpu_targets", &kvpack::cpu_targets,
        "Every build of the CPU kernels this processor runs, best first.");
  m.def("get_num_threads", &kvpack::num_threads,
        "Threads used by kvpack's parallel loops: those set by set_num_threads, else the OpenMP "
        "runtime's count (OMP_NUM_THREADS, or torch.set_num_threads in a process with torch: "
        "both share one OpenMP runtime and its workers in a source build; the wheel carries its "
        "own libgomp, so there the two counts are set apart).");
  m.def(
      "set_num_threads", [](const Arg<int>& n) { kvpack::set_num_threads(n.as("n")); },
      py::arg("n"),
      "Sets the threads used by kvpack's parallel loops (>= 1), from then on independent of "
      "the OpenMP runtime's count.");
  m.def(
      "_data_pointer",
      [](const py::object& array) {
        return reinterpret_cast<std::uintptr_t>(
            strided_kv_view(as_array(array, "array"), "array").data);
      },
      py::arg("array"), "Address the core sees for a KV array (for zero-copy tests).");
  m.def(
      "_as_array", [](const py::object& object) { return as_array(object, "array"); },
      py::arg("array"), "The NumPy view the bindings take of an array argument (for tests).");

  bind_methods(m);
  bind_attention(m);
  bind_clustering(m);
  bind_compression(m);
  bind_quantization(m);
  bind_store(m);
}
