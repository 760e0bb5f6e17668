// k-means over the keys of each KV head: cosine (spherical) by default, as ClusterKV
// clusters keys, or Euclidean. Assignment is a GEMM plus an argmax; every result is
// deterministic for a seed whatever the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/common.h"

namespace kvpack {

/// How k-means picks its first centroids.
enum class KMeansInit : int {
  PlusPlus = 0,  ///< k-means++: each next centroid sampled by its distance to the chosen ones
  Random = 1,    ///< a seeded random sample of distinct points
};

/// Parameters of kmeans.
struct KMeansParams {
  std::int64_t n_clusters = 0;  ///< k, required; 1 <= k <= points
  int iterations = 20;          ///< at most this many assignment + update rounds
  std::uint64_t seed = 0;       ///< seed of the initialisation
  bool spherical = true;        ///< cosine k-means on L2-normalised points
  KMeansInit init = KMeansInit::PlusPlus;
};

/// Result of kmeans for one set of points.
struct KMeansResult {
  std::vector<float> centroids;      ///< size k * dim; unit norm when spherical
  std::vector<std::int32_t> labels;  ///< size n: the centroid each point is assigned to
  double objective = 0.0;            ///< sum of (1 - cos) when spherical, else squared distances
  std::vector<double> history;       ///< objective after each assignment
  int iterations = 0;                ///< assignments done (early stop when no label changes)
};

/// k-means of n points of dimension dim.
/// @param points          size n * dim, storage `dtype`
/// @param init_centroids  null, or size k * dim float32: start from these instead of `init`
KMeansResult kmeans(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                    const KMeansParams& params, const float* init_centroids = nullptr);

/// The initial centroids kmeans starts from (k * dim floats; unit rows when spherical),
/// so every backend starts from the same point.
std::vector<float> kmeans_initial_centroids(const void* points, DType dtype, std::int64_t n,
                                            std::int64_t dim, const KMeansParams& params);

/// k-means of every head of a [heads, n, dim] view, heads in parallel when there are
/// enough of them. init_centroids: null or size heads * k * dim.
std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids = nullptr);

}  // namespace kvpack
