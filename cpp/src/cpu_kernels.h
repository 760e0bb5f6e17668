// The hot CPU kernels (attention, k-means, centroid, page and token scoring, float16
// conversion),
// compiled once per instruction set: every build of kernel sources puts its definitions in
// namespace kvpack::KVPACK_TARGET_NS and a table of them (CpuKernels); cpu_dispatch.cpp
// implements the public functions by calling the table of the best build the processor can
// run. One source, several builds (CMake's KVPACK_CPU_TARGETS): no kernel is written twice.
#pragma once

#include <memory>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/cpu.h"
#include "kvpack/kmeans.h"
#include "kvpack/quest.h"
#include "kvpack/select.h"

namespace kvpack {

/// kvpack::kmeans over a backend (the overload set has no single address to take).
using KMeansLoop = KMeansResult(KMeansBackend& backend, const KMeansParams& params,
                                const float* init_centroids);
/// kvpack::kmeans over n points of dimension dim.
using KMeansPoints = KMeansResult(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                                  const KMeansParams& params, const float* init_centroids);

/// One build of the kernels, by the public function each one implements.
struct CpuKernels {
  const char* target;  ///< the instruction set it was compiled for, e.g. "x86-64-v3"
  decltype(&kvpack::cpu::decode_attention) decode_attention;
  decltype(&kvpack::cpu::accumulated_attention) accumulated_attention;
  decltype(&kvpack::held_attention) held_attention;
  decltype(&kvpack::cpu::rank_rows) rank_rows;
  decltype(&kvpack::cpu::kmeans_heads) kmeans_heads;
  decltype(&kvpack::inner_products) inner_products;
  decltype(&kvpack::page_bound_scores) page_bound_scores;
  decltype(&kvpack::gather_scores) gather_scores;
  decltype(&kvpack::weighted_value_sum) weighted_value_sum;
  decltype(&kvpack::cpu_kmeans_backend) cpu_kmeans_backend;
  KMeansLoop* kmeans_loop;
  KMeansPoints* kmeans_points;
  decltype(&kvpack::kmeans_initial_centroids) kmeans_initial_centroids;
  decltype(&detail::half_to_float) half_to_float;
  decltype(&detail::float_to_half) float_to_half;
};

}  // namespace kvpack

#ifdef KVPACK_TARGET_NS
// This build's kernels, declared with the public signatures (function types, so they
// cannot drift from the headers), and its table (cpu_kernels.cpp).
namespace kvpack::KVPACK_TARGET_NS {
namespace cpu {
decltype(kvpack::cpu::decode_attention) decode_attention;
decltype(kvpack::cpu::accumulated_attention) accumulated_attention;
decltype(kvpack::cpu::rank_rows) rank_rows;
decltype(kvpack::cpu::kmeans_heads) kmeans_heads;
}  // namespace cpu
decltype(kvpack::held_attention) held_attention;
decltype(kvpack::inner_products) inner_products;
decltype(kvpack::page_bound_scores) page_bound_scores;
decltype(kvpack::gather_scores) gather_scores;
decltype(kvpack::weighted_value_sum) weighted_value_sum;
decltype(kvpack::cpu_kmeans_backend) cpu_kmeans_backend;
KMeansLoop kmeans;
KMeansPoints kmeans;
decltype(kvpack::kmeans_initial_centroids) kmeans_initial_centroids;

extern const CpuKernels kernels;
}  // namespace kvpack::KVPACK_TARGET_NS
#endif
