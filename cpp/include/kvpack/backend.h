// Which backends this build has and which can run here. The CPU backend always
// exists; the CUDA one exists when kvpack was built with nvcc and runs when a GPU is visible.
#pragma once

namespace kvpack {

/// True when kvpack was compiled with its CUDA backend.
bool cuda_compiled();

/// True when the CUDA backend is compiled and at least one GPU is usable.
bool cuda_available();

}  // namespace kvpack
