// Scoring rows against a query (a GEMV) and ranking the scores per head: the hot half of
// selection, compiled for every CPU target (cpu_kernels.h).

#include <Eigen/Core>
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "kvpack/cpu.h"
#include "kvpack/select.h"

namespace kvpack::KVPACK_TARGET_NS {

void inner_products(const float* rows, std::int64_t n, std::int64_t dim, const float* q,
                    float* out) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMatrix> m(rows, n, dim);
  Eigen::Map<const Eigen::VectorXf> v(q, dim);
  Eigen::Map<Eigen::VectorXf>(out, n).noalias() = m * v;
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
