// Lloyd's k-means with a GEMM assignment (Eigen) in fixed blocks of points, so the
// labels, sums and objective are the same for any thread count. Compiled once for every
// CPU target (cpu_kernels.h).

#include "kvpack/kmeans.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "cpu_kernels.h"
#include "kvpack/convert.h"
#include "kvpack/cpu.h"
#include "kvpack/parallel.h"

namespace kvpack::KVPACK_TARGET_NS {

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr std::int64_t kBlockPoints = 512;

// A uniform double in [0, 1) from a portable generator (same stream on every platform).
double uniform(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

void normalise_rows(RowMatrix& m) {
  for (Eigen::Index i = 0; i < m.rows(); ++i) {
    const float norm = m.row(i).norm();
    if (norm > 0.0f) m.row(i) /= norm;
  }
}

// Points as float32 (unit rows when spherical) and their squared norms.
struct Points {
  RowMatrix x;
  Eigen::VectorXf squared_norms;
};

Points prepare(const void* data, DType dtype, std::int64_t n, std::int64_t dim, bool spherical) {
  Points p;
  p.x.resize(n, dim);
  to_float(data, dtype, n * dim, p.x.data());
  if (spherical) normalise_rows(p.x);
  p.squared_norms = p.x.rowwise().squaredNorm();
  return p;
}

// Cost of a point with squared norm xx against a centroid with squared norm cc at
// inner product s: 1 - cos for unit vectors, else the squared distance.
inline float cost(bool spherical, float s, float xx, float cc) {
  return spherical ? 1.0f - s : std::max(0.0f, xx - 2.0f * s + cc);
}

// The score assignment maximises: the similarity (spherical) or minus the distance.
// Either moves by at most ||c_new - c_old|| when a centroid moves, which is what lets
// the bounds below skip points whose label cannot change (Hamerly's pruning).
inline float score(bool spherical, float s, float xx, float cc) {
  return spherical ? s : -std::sqrt(cost(false, s, xx, cc));
}

// Per-point assignment state: label, a lower bound on the score of the assigned
// centroid and an upper bound on the score of every other centroid.
struct Assignment {
  std::vector<std::int32_t> labels;
  std::vector<float> best, second;
};

// Assigns the points in `active` (all when empty and full) to their best centroid,
// exactly (GEMM in fixed blocks, ties to the lower index).
void assign_points(const Points& p, const RowMatrix& c, bool spherical, bool parallel,
                   const std::vector<std::int64_t>& active, bool all, Assignment& a) {
  const std::int64_t n = all ? p.x.rows() : static_cast<std::int64_t>(active.size());
  const std::int64_t k = c.rows(), dim = c.cols();
  const Eigen::VectorXf cc = c.rowwise().squaredNorm();
  const std::int64_t blocks = (n + kBlockPoints - 1) / kBlockPoints;
  auto run_block = [&](std::int64_t b) {
    const std::int64_t first = b * kBlockPoints, rows = std::min(kBlockPoints, n - first);
    RowMatrix xb;
    if (!all) {
      xb.resize(rows, dim);
      for (std::int64_t r = 0; r < rows; ++r) xb.row(r) = p.x.row(active[first + r]);
    }
    RowMatrix s(rows, k);
    if (all) {
      s.noalias() = p.x.middleRows(first, rows) * c.transpose();
    } else {
      s.noalias() = xb * c.transpose();
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t i = all ? first + r : active[first + r];
      const float xx = p.squared_norms[i];
      const float* sr = s.data() + r * k;
      std::int64_t best = 0;
      float best_value = spherical ? sr[0] : 2.0f * sr[0] - cc[0];
      float second_value = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 1; j < k; ++j) {
        const float value = spherical ? sr[j] : 2.0f * sr[j] - cc[j];
        if (value > best_value) {
          second_value = best_value;
          best_value = value;
          best = j;
        } else if (value > second_value) {
          second_value = value;
        }
      }
      a.labels[i] = static_cast<std::int32_t>(best);
      a.best[i] = score(spherical, sr[best], xx, cc[best]);
      a.second[i] = spherical ? second_value
                    : k > 1   ? -std::sqrt(std::max(0.0f, xx - second_value))
                              : -std::numeric_limits<float>::infinity();
    }
  };
  if (parallel) {
    parallel_for(blocks, run_block);
  } else {
    for (std::int64_t b = 0; b < blocks; ++b) run_block(b);
  }
}

// One assignment round: recomputes only the points whose bounds cannot prove their
// label, then the exact cost of every point under its label. Returns the summed cost.
double assign_round(const Points& p, const RowMatrix& c, bool spherical, bool parallel,
                    bool have_bounds, Assignment& a, std::vector<float>& costs) {
  const std::int64_t n = p.x.rows();
  std::vector<std::int64_t> active;
  if (have_bounds) {
    for (std::int64_t i = 0; i < n; ++i) {
      // A margin keeps float rounding from deciding a label the exact GEMM would not.
      const float margin = 1e-5f * (1.0f + std::abs(a.best[i]));
      if (!(a.best[i] - margin > a.second[i])) active.push_back(i);
    }
  }
  assign_points(p, c, spherical, parallel, active, !have_bounds, a);
  const Eigen::VectorXf cc = c.rowwise().squaredNorm();
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t j = a.labels[i];
    const float s = p.x.row(i).dot(c.row(j));
    costs[i] = cost(spherical, s, p.squared_norms[i], cc[j]);
    a.best[i] = score(spherical, s, p.squared_norms[i], cc[j]);  // exact again
    total += costs[i];
  }
  return total;
}

// Centroids from labels: member means (renormalised when spherical); an empty cluster
// is re-seeded with the costliest point not yet used for that.
void update_centroids(const Points& p, const std::int32_t* labels, bool spherical,
                      std::vector<float>& costs, RowMatrix& c) {
  const std::int64_t n = p.x.rows(), k = c.rows(), dim = c.cols();
  Eigen::MatrixXd sums = Eigen::MatrixXd::Zero(k, dim);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(k), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    sums.row(labels[i]) += p.x.row(i).cast<double>();
    ++counts[static_cast<std::size_t>(labels[i])];
  }
  for (std::int64_t j = 0; j < k; ++j) {
    if (counts[static_cast<std::size_t>(j)] == 0) {
      const auto farthest = std::max_element(costs.begin(), costs.end()) - costs.begin();
      c.row(j) = p.x.row(farthest);
      costs[static_cast<std::size_t>(farthest)] = -std::numeric_limits<float>::infinity();
      continue;
    }
    Eigen::RowVectorXd mean =
        sums.row(j) / static_cast<double>(counts[static_cast<std::size_t>(j)]);
    if (spherical) {
      const double norm = mean.norm();
      if (norm > 0.0) mean /= norm;
    }
    c.row(j) = mean.cast<float>();
  }
}

// The CPU backend: points prepared once in host memory; assignment by GEMM in fixed
// blocks with Hamerly bounds, so labels, sums and costs are the same for any thread count.
class CpuKMeans final : public KMeansBackend {
 public:
  CpuKMeans(const void* data, DType dtype, std::int64_t n, std::int64_t dim, bool spherical,
            bool parallel)
      : p_(prepare(data, dtype, n, dim, spherical)), spherical_(spherical), parallel_(parallel) {
    costs_.assign(static_cast<std::size_t>(n), 0.0f);
  }

  std::int64_t size() const override { return p_.x.rows(); }
  std::int64_t dim() const override { return p_.x.cols(); }

  void gather(const std::int64_t* indices, std::int64_t count, float* rows,
              float* squared_norms) const override {
    const std::int64_t d = dim();
    for (std::int64_t r = 0; r < count; ++r) {
      Eigen::Map<Eigen::RowVectorXf>(rows + r * d, d) = p_.x.row(indices[r]);
      squared_norms[r] = p_.squared_norms[indices[r]];
    }
  }

  void set_centroids(const float* centroids, std::int64_t k) override {
    c_ = Eigen::Map<const RowMatrix>(centroids, k, dim());
    const auto n = static_cast<std::size_t>(size());
    a_.labels.assign(n, -1);
    a_.best.assign(n, 0.0f);
    a_.second.assign(n, 0.0f);
    have_bounds_ = false;
  }

  double assign(bool* changed) override {
    previous_ = a_.labels;
    const double total = assign_round(p_, c_, spherical_, parallel_, have_bounds_, a_, costs_);
    *changed = a_.labels != previous_;
    return total;
  }

  void update() override {
    const RowMatrix moved = c_;
    update_centroids(p_, a_.labels.data(), spherical_, costs_, c_);
    // Loosen the bounds by how far the centroids moved.
    const Eigen::VectorXf shift = (c_ - moved).rowwise().norm();
    const float max_shift = shift.maxCoeff();
    for (std::int64_t i = 0; i < size(); ++i) {
      a_.best[i] -= shift[a_.labels[i]];
      a_.second[i] += max_shift;
    }
    have_bounds_ = true;
  }

  void finish(KMeansResult& result) override {
    const Eigen::VectorXf cc = c_.rowwise().squaredNorm();
    double total = 0.0;
    for (std::int64_t i = 0; i < size(); ++i) {
      const std::int32_t j = a_.labels[i];
      total += cost(spherical_, p_.x.row(i).dot(c_.row(j)), p_.squared_norms[i], cc[j]);
    }
    result.objective = total;
    result.labels = std::move(a_.labels);
    result.centroids.assign(c_.data(), c_.data() + c_.size());
  }

 private:
  Points p_;
  bool spherical_, parallel_;
  RowMatrix c_;
  Assignment a_;
  std::vector<std::int32_t> previous_;
  std::vector<float> costs_;
  bool have_bounds_ = false;
};

// The first centroids: a seeded random sample of distinct points, or k-means++.
RowMatrix initial_centroids(const KMeansBackend& backend, const KMeansParams& params) {
  const std::int64_t n = backend.size(), k = params.n_clusters, dim = backend.dim();
  std::mt19937_64 rng(params.seed);
  RowMatrix c(k, dim);
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[i] = i;
  if (params.init == KMeansInit::Random) {
    for (std::int64_t j = 0; j < k; ++j) {  // partial Fisher-Yates
      const auto pick = j + static_cast<std::int64_t>(uniform(rng) * static_cast<double>(n - j));
      std::swap(order[j], order[pick]);
    }
    Eigen::VectorXf norms(k);
    backend.gather(order.data(), k, c.data(), norms.data());
    return c;
  }
  // k-means++ over a seeded sample of at most kPlusPlusPool * k points: each next
  // centroid drawn with probability proportional to its cost. Seeding is sequential in
  // k, so the sample keeps its passes cache-resident; it changes little in the result.
  constexpr std::int64_t kPlusPlusPool = 16;
  const std::int64_t pool_size = std::min(n, kPlusPlusPool * k);
  if (pool_size < n) {
    for (std::int64_t j = 0; j < pool_size; ++j) {
      const auto pick = j + static_cast<std::int64_t>(uniform(rng) * static_cast<double>(n - j));
      std::swap(order[j], order[pick]);
    }
  }
  RowMatrix pool(pool_size, dim);
  Eigen::VectorXf pool_norms(pool_size);
  backend.gather(order.data(), pool_size, pool.data(), pool_norms.data());
  Eigen::VectorXf nearest =
      Eigen::VectorXf::Constant(pool_size, std::numeric_limits<float>::infinity());
  std::int64_t pick = std::min(
      pool_size - 1, static_cast<std::int64_t>(uniform(rng) * static_cast<double>(pool_size)));
  for (std::int64_t j = 0; j < k; ++j) {
    c.row(j) = pool.row(pick);
    const Eigen::VectorXf s = pool * c.row(j).transpose();
    const float cc = c.row(j).squaredNorm();
    double total = 0.0;
    for (std::int64_t i = 0; i < pool_size; ++i) {
      nearest[i] = std::min(nearest[i], cost(params.spherical, s[i], pool_norms[i], cc));
      total += nearest[i];
    }
    if (j + 1 == k) break;
    if (total <= 0.0) {  // every point sits on a chosen centroid: any point will do
      pick = static_cast<std::int64_t>(uniform(rng) * static_cast<double>(pool_size));
      continue;
    }
    const double target = uniform(rng) * total;
    double running = 0.0;
    pick = pool_size - 1;
    for (std::int64_t i = 0; i < pool_size; ++i) {
      running += nearest[i];
      if (running > target && nearest[i] > 0.0f) {
        pick = i;
        break;
      }
    }
  }
  return c;
}

void check_kmeans_args(std::int64_t n, std::int64_t dim, const KMeansParams& params) {
  KVPACK_CHECK(n >= 1 && dim >= 1,
               "points: expected at least one point of dimension >= 1, got " << n << " x " << dim);
  KVPACK_CHECK(
      params.n_clusters >= 1 && params.n_clusters <= n,
      "n_clusters: expected 1 <= n_clusters <= points=" << n << ", got " << params.n_clusters);
  KVPACK_CHECK(params.iterations >= 1, "iters: expected >= 1, got " << params.iterations);
}

}  // namespace

std::unique_ptr<KMeansBackend> cpu_kmeans_backend(const void* points, DType dtype, std::int64_t n,
                                                  std::int64_t dim, bool spherical, bool parallel) {
  KVPACK_CHECK(points, "points: null pointer");
  KVPACK_CHECK(n >= 1 && dim >= 1,
               "points: expected at least one point of dimension >= 1, got " << n << " x " << dim);
  return std::make_unique<CpuKMeans>(points, dtype, n, dim, spherical, parallel);
}

KMeansResult kmeans(KMeansBackend& backend, const KMeansParams& params,
                    const float* init_centroids) {
  check_kmeans_args(backend.size(), backend.dim(), params);
  RowMatrix c;
  if (init_centroids) {
    c = Eigen::Map<const RowMatrix>(init_centroids, params.n_clusters, backend.dim());
    if (params.spherical) normalise_rows(c);
  } else {
    c = initial_centroids(backend, params);
  }
  backend.set_centroids(c.data(), params.n_clusters);
  KMeansResult result;
  for (int it = 0; it < params.iterations; ++it) {
    bool changed = false;
    result.history.push_back(backend.assign(&changed));
    result.iterations = it + 1;
    if (it > 0 && !changed) break;  // converged: the centroids already are their means
    backend.update();
  }
  backend.finish(result);
  return result;
}

std::vector<float> kmeans_initial_centroids(const void* points, DType dtype, std::int64_t n,
                                            std::int64_t dim, const KMeansParams& params) {
  check_kmeans_args(n, dim, params);
  const RowMatrix c =
      initial_centroids(CpuKMeans(points, dtype, n, dim, params.spherical, true), params);
  return std::vector<float>(c.data(), c.data() + c.size());
}

KMeansResult kmeans(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                    const KMeansParams& params, const float* init_centroids) {
  check_kmeans_args(n, dim, params);
  // Qualified: argument-dependent lookup would also find the public kvpack:: functions.
  const auto backend =
      KVPACK_TARGET_NS::cpu_kmeans_backend(points, dtype, n, dim, params.spherical, true);
  return KVPACK_TARGET_NS::kmeans(*backend, params, init_centroids);
}

namespace cpu {

std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids) {
  KVPACK_CHECK(points.heads >= 1, "points: expected at least one head, got " << points.heads);
  std::vector<KMeansResult> results(static_cast<std::size_t>(points.heads));
  const std::int64_t init_stride = params.n_clusters * points.dim;
  auto one_head = [&](std::int64_t h, bool parallel) {
    results[static_cast<std::size_t>(h)] = KVPACK_TARGET_NS::kmeans(
        *KVPACK_TARGET_NS::cpu_kmeans_backend(points.row(h, 0), points.dtype, points.tokens,
                                              points.dim, params.spherical, parallel),
        params, init_centroids ? init_centroids + h * init_stride : nullptr);
  };
  // Heads across threads when they share out evenly (or are many), else blocks of
  // points: 3 heads on 2 threads would leave one thread idle a third of the time.
  const std::int64_t threads = num_threads();
  if (points.heads % threads == 0 || points.heads >= 4 * threads) {
    parallel_for(points.heads, [&](std::int64_t h) { one_head(h, false); });
  } else {
    for (std::int64_t h = 0; h < points.heads; ++h) one_head(h, true);
  }
  return results;
}

}  // namespace cpu

}  // namespace kvpack::KVPACK_TARGET_NS
