#include "kvpack/parallel.h"

#include <omp.h>

#include <atomic>

#include "kvpack/common.h"

namespace kvpack {

namespace {
std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{omp_get_max_threads()};
  return threads;
}
}  // namespace

int num_threads() {
  return thread_setting().load();
}

void set_num_threads(int n) {
  // Beyond this a parallel region cannot start its threads (OpenMP's own limit is lower).
  constexpr int kMaxThreads = 1024;
  KVPACK_CHECK(n >= 1 && n <= kMaxThreads,
               "n: expected 1 to " << kMaxThreads << " threads, got " << n);
  thread_setting().store(n);
}

}  // namespace kvpack
