// Scoring rows against a query (a GEMV, and Quest's page bounds) and ranking the scores per
// head: the hot half of selection, compiled for every CPU target (cpu_kernels.h).

#include <Eigen/Core>
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "kvpack/cpu.h"
#include "kvpack/quest.h"
#include "kvpack/select.h"

namespace kvpack::KVPACK_TARGET_NS {

void inner_products(const float* rows, std::int64_t n, std::int64_t dim, const float* q,
                    float* out) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMatrix> m(rows, n, dim);
  Eigen::Map<const Eigen::VectorXf> v(q, dim);
  Eigen::Map<Eigen::VectorXf>(out, n).noalias() = m * v;
}

void page_bound_scores(const float* q, std::int64_t n_q, const float* lo, const float* hi,
                       std::int64_t n_pages, std::int64_t dim, float* scores) {
  for (std::int64_t p = 0; p < n_pages; ++p) {
    const float* lo_p = lo + p * dim;
    const float* hi_p = hi + p * dim;
    float s = 0.0f;
    for (std::int64_t g = 0; g < n_q; ++g) {
      const float* qv = q + g * dim;
#pragma omp simd reduction(+ : s)
      for (std::int64_t c = 0; c < dim; ++c) s += std::max(qv[c] * lo_p[c], qv[c] * hi_p[c]);
    }
    scores[p] = s;
  }
}

namespace cpu {

void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out) {
  for (std::int64_t h = 0; h < heads; ++h) {
    float* head_scores = scores + h * n;
    inner_products(rows + h * n * dim, n, dim, q + h * dim, head_scores);
    const std::vector<std::int32_t> best = top_k(head_scores, n, k);
    std::copy(best.begin(), best.end(), out + h * k);
  }
}

}  // namespace cpu

}  // namespace kvpack::KVPACK_TARGET_NS
