#include "kvpack/parallel.h"

#include <omp.h>

#include <atomic>

#include "kvpack/common.h"

namespace kvpack {

namespace {
// 0: follow the OpenMP runtime. In a process with torch both share one OpenMP runtime
// (one libgomp, one pool of workers), so kvpack's regions then run on torch's workers
// with the count torch.set_num_threads chose, and never add threads of their own.
std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{0};
  return threads;
}
}  // namespace

int num_threads() {
  const int n = thread_setting().load();
  return n > 0 ? n : omp_get_max_threads();
}

void set_num_threads(int n) {
  // Beyond this a parallel region cannot start its threads (OpenMP's own limit is lower).
  constexpr int kMaxThreads = 1024;
  KVPACK_CHECK(n >= 1 && n <= kMaxThreads,
               "n: expected 1 to " << kMaxThreads << " threads, got " << n);
  thread_setting().store(n);
}

}  // namespace kvpack
