// The table of one build of the CPU kernels (see cpu_kernels.h); compiled with each of
// them, in its namespace.

#include "cpu_kernels.h"

#include "kvpack/convert.h"

namespace kvpack::KVPACK_TARGET_NS {

namespace {

void half_to_float(const void* src, std::int64_t n, float* dst) {
  to_float(src, DType::Float16, n, dst);
}

void float_to_half(const float* src, std::int64_t n, void* dst) {
  from_float(src, n, DType::Float16, dst);
}

}  // namespace

const CpuKernels kernels = {
    KVPACK_TARGET_NAME,
    &cpu::decode_attention,
    &cpu::accumulated_attention,
    &held_attention,
    &cpu::rank_rows,
    &cpu::kmeans_heads,
    &inner_products,
    &page_bound_scores,
    &gather_scores,
    &weighted_value_sum,
    &cpu_kmeans_backend,
    &kmeans,
    &kmeans,
    &kmeans_initial_centroids,
    &half_to_float,
    &float_to_half,
};

}  // namespace kvpack::KVPACK_TARGET_NS
