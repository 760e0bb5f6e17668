// The public CPU kernels, each a call into the table of the build of them that runs here:
// the best instruction set of KVPACK_CPU_TARGETS this processor supports (chosen once), or
// the one the environment variable KVPACK_CPU_TARGET names.

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "kvpack/backend.h"
#include "kvpack_cpu_targets.h"  // KVPACK_FOR_EACH_CPU_TARGET, written by CMake

#define KVPACK_DECLARE_TABLE(ns)   \
  namespace kvpack::ns {           \
  extern const CpuKernels kernels; \
  }
KVPACK_FOR_EACH_CPU_TARGET(KVPACK_DECLARE_TABLE)
#undef KVPACK_DECLARE_TABLE

namespace kvpack {

namespace {

// Every build, best first (the order of KVPACK_CPU_TARGETS).
std::vector<const CpuKernels*> builds() {
  return {
#define KVPACK_TABLE_ADDRESS(ns) &ns::kernels,
      KVPACK_FOR_EACH_CPU_TARGET(KVPACK_TABLE_ADDRESS)
#undef KVPACK_TABLE_ADDRESS
  };
}

// True when this processor (and its OS) runs code compiled for `target`: the x86-64
// levels are asked of the CPU; a build for the compiler's own target ("native",
// "default") runs wherever kvpack was built to run.
bool runs_here(const char* target) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(target, "x86-64-v4") == 0) return __builtin_cpu_supports("x86-64-v4");
  if (std::strcmp(target, "x86-64-v3") == 0) return __builtin_cpu_supports("x86-64-v3");
  if (std::strcmp(target, "x86-64-v2") == 0) return __builtin_cpu_supports("x86-64-v2");
#endif
  return true;
}

const CpuKernels& choose() {
  const std::vector<const CpuKernels*> all = builds();
  const char* wanted = std::getenv("KVPACK_CPU_TARGET");
  if (wanted && *wanted) {
    std::string names;
    for (const CpuKernels* build : all) {
      if (std::strcmp(build->target, wanted) == 0 && runs_here(build->target)) return *build;
      if (runs_here(build->target)) names += std::string(names.empty() ? "" : ", ") + build->target;
    }
    KVPACK_CHECK(false, "KVPACK_CPU_TARGET: expected one of the builds this processor runs ("
                            << names << "), got '" << wanted << "'");
  }
  for (const CpuKernels* build : all)
    if (runs_here(build->target)) return *build;
  KVPACK_CHECK(false, "kvpack's CPU kernels: this processor runs none of their builds");
}

const CpuKernels& kernels() {
  static const CpuKernels& chosen = choose();
  return chosen;
}

}  // namespace

const char* cpu_target() {
  return kernels().target;
}

std::vector<std::string> cpu_targets() {
  std::vector<std::string> names;
  for (const CpuKernels* build : builds())
    if (runs_here(build->target)) names.emplace_back(build->target);
  return names;
}

namespace cpu {

void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output) {
  kernels().decode_attention(q, heads_q, keys, values, indices, bias, params, output);
}

void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out) {
  kernels().accumulated_attention(queries, heads_q, window, keys, params, out);
}

void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out) {
  kernels().rank_rows(rows, heads, n, dim, q, k, scores, out);
}

std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids) {
  return kernels().kmeans_heads(points, params, init_centroids);
}

}  // namespace cpu

void held_attention(const float* queries, std::int64_t new_queries, std::int64_t heads_q,
                    std::int64_t first_query, const BatchKVView& keys, const BatchKVView& values,
                    const HeldSlots& slots, const ScoreRules& rules, float* out) {
  kernels().held_attention(queries, new_queries, heads_q, first_query, keys, values, slots, rules,
                           out);
}

void inner_products(const float* rows, std::int64_t n, std::int64_t dim, const float* q,
                    float* out) {
  kernels().inner_products(rows, n, dim, q, out);
}

void page_bound_scores(const float* q, std::int64_t n_q, const float* lo, const float* hi,
                       std::int64_t n_pages, std::int64_t dim, float* scores) {
  kernels().page_bound_scores(q, n_q, lo, hi, n_pages, dim, scores);
}

void gather_scores(const float* q, std::int64_t n_q, const KVView& keys, std::int64_t head,
                   const std::int32_t* tokens, std::int64_t n, float* out) {
  kernels().gather_scores(q, n_q, keys, head, tokens, n, out);
}

void weighted_value_sum(const float* weights, std::int64_t n_q, const KVView& values,
                        std::int64_t head, const std::int32_t* tokens, std::int64_t n, float* out) {
  kernels().weighted_value_sum(weights, n_q, values, head, tokens, n, out);
}

std::unique_ptr<KMeansBackend> cpu_kmeans_backend(const void* points, DType dtype, std::int64_t n,
                                                  std::int64_t dim, bool spherical, bool parallel) {
  return kernels().cpu_kmeans_backend(points, dtype, n, dim, spherical, parallel);
}

KMeansResult kmeans(KMeansBackend& backend, const KMeansParams& params,
                    const float* init_centroids) {
  return kernels().kmeans_loop(backend, params, init_centroids);
}

KMeansResult kmeans(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                    const KMeansParams& params, const float* init_centroids) {
  return kernels().kmeans_points(points, dtype, n, dim, params, init_centroids);
}

std::vector<float> kmeans_initial_centroids(const void* points, DType dtype, std::int64_t n,
                                            std::int64_t dim, const KMeansParams& params) {
  return kernels().kmeans_initial_centroids(points, dtype, n, dim, params);
}

namespace detail {

void half_to_float(const void* src, std::int64_t n, float* dst) {
  kernels().half_to_float(src, n, dst);
}

void float_to_half(const float* src, std::int64_t n, void* dst) {
  kernels().float_to_half(src, n, dst);
}

}  // namespace detail

}  // namespace kvpack
