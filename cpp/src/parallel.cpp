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
  KVPACK_CHECK(n >= 1, "num_threads: expected >= 1, got " << n);
  thread_setting().store(n);
}

}  // namespace kvpack
