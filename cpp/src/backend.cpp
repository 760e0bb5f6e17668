#include "kvpack/backend.h"

#ifdef KVPACK_WITH_CUDA
#include "kvpack/cuda.h"
#endif

namespace kvpack {

bool cuda_compiled() {
#ifdef KVPACK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool cuda_available() {
#ifdef KVPACK_WITH_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

}  // namespace kvpack
