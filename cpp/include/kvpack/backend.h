// Which backends this build has and which can run here, and how an op runs on a GPU.
// The CPU backend always exists; the CUDA one exists when kvpack was built with nvcc and
// runs when a GPU is visible. Each op's dispatcher picks the backend from where its data
// lives (the views' device), so callers never choose with #ifdef.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "kvpack/common.h"

namespace kvpack {

/// True when kvpack was compiled with its CUDA backend.
bool cuda_compiled();

/// True when the CUDA backend is compiled and at least one GPU is usable.
bool cuda_available();

/// The instruction set of the CPU kernels in use: the best of their builds
/// (KVPACK_CPU_TARGETS at configure time) that this processor runs, or the one the
/// environment variable KVPACK_CPU_TARGET names ("native": one build, -march=native;
/// "default": one build for the compiler's default target).
const char* cpu_target();

/// The builds of the CPU kernels this processor runs, best first.
std::vector<std::string> cpu_targets();

/// Throws std::invalid_argument naming `name` unless `device` can run here: always for
/// the CPU; for CUDA, when kvpack was built with it and the ordinal is visible.
void require_device(const Device& device, const char* name);

/// How a CUDA op runs. Ops on the CPU ignore it.
struct Execution {
  void* stream = nullptr;  ///< a cudaStream_t; null: the legacy default stream
  /// Caller-owned device memory the op may use (its *_scratch_bytes); null: the op
  /// allocates (and frees) its own.
  void* scratch = nullptr;
  std::size_t scratch_bytes = 0;  ///< size of `scratch`
  /// Run on this CUDA device although the data is in host memory: inputs are copied to
  /// the device for the call and results back (kvpack's `device="cuda"` on NumPy arrays).
  bool stage_to_cuda = false;
  int cuda_device = 0;  ///< the device of stage_to_cuda
};

}  // namespace kvpack
