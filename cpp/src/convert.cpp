#include "kvpack/convert.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kvpack/parallel.h"

namespace kvpack {

std::int64_t first_non_finite_row(const KVView& view) {
  const std::int64_t rows = view.heads * view.tokens;
  constexpr std::int64_t kRowsPerItem = 256;
  std::atomic<std::int64_t> first{rows};
  parallel_for((rows + kRowsPerItem - 1) / kRowsPerItem, [&](std::int64_t item) {
    std::vector<float> row(static_cast<std::size_t>(view.dim));
    const std::int64_t end = std::min(rows, (item + 1) * kRowsPerItem);
    for (std::int64_t r = item * kRowsPerItem; r < end && r < first.load(); ++r) {
      to_float(view.row(r / view.tokens, r % view.tokens), view.dtype, view.dim, row.data());
      bool finite = true;
#pragma omp simd reduction(&& : finite)
      for (std::int64_t i = 0; i < view.dim; ++i) finite = finite && std::isfinite(row[i]);
      if (!finite) {
        std::int64_t seen = first.load();
        while (r < seen && !first.compare_exchange_weak(seen, r)) {
        }
        return;
      }
    }
  });
  return first.load() == rows ? -1 : first.load();
}

}  // namespace kvpack
