#include "kvpack/convert.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "kvpack/parallel.h"

namespace kvpack {

namespace {

// True when one of the n storage words at p has an all-ones exponent (NaN or Inf): an
// integer test that vectorises and needs no conversion.
template <class Word>
bool any_non_finite(const void* p, std::int64_t n, Word exponent) {
  const Word* words = static_cast<const Word*>(p);
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (std::int64_t i = 0; i < n; ++i) hit |= (words[i] & exponent) == exponent;
  return hit != 0;
}

bool row_non_finite(const void* row, DType dtype, std::int64_t dim) {
  switch (dtype) {
    case DType::Float16:
      return any_non_finite<std::uint16_t>(row, dim, 0x7c00u);
    case DType::BFloat16:
      return any_non_finite<std::uint16_t>(row, dim, 0x7f80u);
    case DType::Float32:
      break;
  }
  return any_non_finite<std::uint32_t>(row, dim, 0x7f800000u);
}

}  // namespace

std::int64_t first_non_finite_row(const KVView& view) {
  const std::int64_t rows = view.heads * view.tokens;
  constexpr std::int64_t kRowsPerItem = 1024;
  std::atomic<std::int64_t> first{rows};
  parallel_for((rows + kRowsPerItem - 1) / kRowsPerItem, [&](std::int64_t item) {
    const std::int64_t end = std::min(rows, (item + 1) * kRowsPerItem);
    for (std::int64_t r = item * kRowsPerItem; r < end && r < first.load(); ++r) {
      if (row_non_finite(view.row(r / view.tokens, r % view.tokens), view.dtype, view.dim)) {
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
