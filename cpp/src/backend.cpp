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

namespace kvpack {

void require_device(const Device& device, const char* name) {
  if (!device.is_cuda()) return;
  KVPACK_CHECK(cuda_compiled(), name << ": 'cuda' requested (" << device_name(device)
                                     << ") but kvpack was built without CUDA");
#ifdef KVPACK_WITH_CUDA
  const int count = cuda::device_count();
  KVPACK_CHECK(device.index >= 0 && device.index < count,
               name << ": 'cuda' requested (" << device_name(device) << ") but "
                    << (count ? "that device is not visible" : "no CUDA device is visible") << " ("
                    << count << " visible)");
#endif
}

}  // namespace kvpack
