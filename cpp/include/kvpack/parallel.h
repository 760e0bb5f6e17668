// Thread control and an exception-safe parallel loop: an exception thrown inside
// an OpenMP region is caught there and rethrown on the calling thread.
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>

namespace kvpack {

/// Number of threads kvpack's parallel loops use: the count set by set_num_threads, or
/// else the OpenMP runtime's (omp_get_max_threads: OMP_NUM_THREADS, or what the host
/// program, e.g. torch.set_num_threads, gave the runtime).
int num_threads();

/// Sets the number of threads for kvpack's parallel loops (>= 1), from then on
/// independent of the OpenMP runtime's setting.
void set_num_threads(int n);

/// Runs body(i) for i in [0, n) across threads (dynamic schedule); the first
/// exception raised by any iteration is rethrown after the loop.
template <class Body>
void parallel_for(std::int64_t n, Body&& body) {
  if (n <= 1 || num_threads() == 1) {  // no thread team for work that cannot be shared
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
  for (std::int64_t i = 0; i < n; ++i) {
    try {
      body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace kvpack
