// The table of one build of the CPU kernels (see cpu_kernels.h); compiled with each of
// them, in its namespace.

#include "cpu_kernels.h"

namespace kvpack::KVPACK_TARGET_NS {

const CpuKernels kernels = {
    KVPACK_TARGET_NAME,
    &cpu::decode_attention,
    &cpu::accumulated_attention,
    &cpu::rank_rows,
    &cpu::kmeans_heads,
    &inner_products,
    &cpu_kmeans_backend,
    &kmeans,
    &kmeans,
    &kmeans_initial_centroids,
};

}  // namespace kvpack::KVPACK_TARGET_NS
