// k-means over the keys of each KV head: cosine (spherical) by default, as ClusterKV
// clusters keys, or Euclidean. Assignment is a GEMM plus an argmax; every result is
// deterministic for a seed whatever the thread count.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvpack/backend.h"
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

/// The backend half of k-means, as faiss's Clustering takes an Index: it holds one set of
/// n points (prepared: float32, unit rows when spherical), assigns them to centroids and
/// updates the centroids from the labels. The loop around it (initialisation, rounds,
/// early stop, objective history) is `kmeans(KMeansBackend&, ...)`, one for every backend.
class KMeansBackend {
 public:
  virtual ~KMeansBackend() = default;
  /// Number of points n.
  virtual std::int64_t size() const = 0;
  /// Dimension of the points.
  virtual std::int64_t dim() const = 0;
  /// The prepared points at `indices` (size count) into `rows` (size count * dim) and
  /// their squared norms into `squared_norms` (size count): what initialisation samples.
  virtual void gather(const std::int64_t* indices, std::int64_t count, float* rows,
                      float* squared_norms) const = 0;
  /// Starts from `centroids` (size k * dim, host memory; unit rows when spherical) and
  /// forgets the previous labels.
  virtual void set_centroids(const float* centroids, std::int64_t k) = 0;
  /// Assigns every point to its best centroid (ties to the lower index). Returns the
  /// summed cost (1 - cos when spherical, else the squared distance) and sets *changed
  /// when a label differs from the previous assignment (always after set_centroids).
  virtual double assign(bool* changed) = 0;
  /// Centroids from the last assignment: member means (renormalised when spherical); an
  /// empty cluster takes the costliest point not yet used for that.
  virtual void update() = 0;
  /// Moves the last labels and the centroids into `result`, with the objective of those
  /// labels under those centroids.
  virtual void finish(KMeansResult& result) = 0;
};

/// The CPU backend over n points of storage `dtype` at `points` (size n * dim, host
/// memory, read once here). `parallel`: blocks of points across threads.
std::unique_ptr<KMeansBackend> cpu_kmeans_backend(const void* points, DType dtype, std::int64_t n,
                                                  std::int64_t dim, bool spherical,
                                                  bool parallel = true);

/// Lloyd's k-means over `backend`: initial centroids (`init_centroids`, size k * dim,
/// normalised when spherical, else params.init over the backend's points), then at most
/// params.iterations rounds of assign + update, stopping when no label changes.
KMeansResult kmeans(KMeansBackend& backend, const KMeansParams& params,
                    const float* init_centroids = nullptr);

/// k-means of n points of dimension dim.
/// @param points          size n * dim, storage `dtype`
/// @param init_centroids  null, or size k * dim float32: start from these instead of `init`
KMeansResult kmeans(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                    const KMeansParams& params, const float* init_centroids = nullptr);

/// The initial centroids kmeans starts from (k * dim floats; unit rows when spherical),
/// so every backend starts from the same point.
std::vector<float> kmeans_initial_centroids(const void* points, DType dtype, std::int64_t n,
                                            std::int64_t dim, const KMeansParams& params);

/// k-means of every head of a [heads, n, dim] view. init_centroids: null or size
/// heads * k * dim, host memory. The backend is the one of points.device, or CUDA with
/// exec.stage_to_cuda (the points are copied to the device once); results in host memory.
std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids = nullptr,
                                       const Execution& exec = {});

}  // namespace kvpack
