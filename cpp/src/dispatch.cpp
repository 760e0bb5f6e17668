// The dispatchers: one per op that has a CUDA twin. Each checks that its arguments live
// on one device, then runs the backend of that device (the CPU reference for host
// memory). The only place that asks whether kvpack was built with CUDA.

#include <vector>

#include "kvpack/attention.h"
#include "kvpack/backend.h"
#include "kvpack/cpu.h"
#include "kvpack/kmeans.h"
#include "kvpack/select.h"
#ifdef KVPACK_WITH_CUDA
#include "kvpack/cuda.h"
#endif

namespace kvpack {

namespace {

// The device an op runs on: where its data is, or CUDA when host data is to be staged.
Device backend_device(const Device& data, const Execution& exec) {
  if (!data.is_cuda() && exec.stage_to_cuda) return Device{DeviceType::CUDA, exec.cuda_device};
  return data;
}

void require_same_device(const Device& device, const Device& other, const char* name) {
  KVPACK_CHECK(other == device, name << ": expected data on " << device_name(device) << ", got "
                                     << device_name(other));
}

#ifndef KVPACK_WITH_CUDA
[[noreturn]] void no_cuda() {
  KVPACK_CHECK(false, "device: kvpack was built without CUDA");
}
#endif

}  // namespace

void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output,
                      const Execution& exec) {
  require_same_device(keys.device, values.device, "values");
  if (indices) require_same_device(keys.device, indices->device, "indices");
  const Device device = backend_device(keys.device, exec);
  if (!device.is_cuda()) {
    cpu::decode_attention(q, heads_q, keys, values, indices, bias, params, output);
    return;
  }
  require_device(device, keys.device.is_cuda() ? "keys" : "device");
  KVPACK_CHECK(keys.heads > 0 && keys.dim > 0 && values.dtype == keys.dtype &&
                   values.heads == keys.heads && values.tokens == keys.tokens &&
                   values.dim == keys.dim,
               "values: expected the shape and dtype of keys");
  KVPACK_CHECK(q && output.out, "q/out: null pointer");
  KVPACK_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
               "q: expected heads_q to be a positive multiple of heads_kv=" << keys.heads
                                                                            << ", got " << heads_q);
  KVPACK_CHECK(!indices || indices->rows == keys.heads || indices->rows == heads_q,
               "indices: expected heads_kv or heads_q rows, got " << (indices ? indices->rows : 0));
#ifdef KVPACK_WITH_CUDA
  if (keys.device.is_cuda()) {
    cuda::decode_attention(q, heads_q, keys, values, indices, bias, params, output, exec);
  } else {
    cuda::decode_attention_staged(q, heads_q, keys, values, indices, bias, params, output, exec);
  }
#else
  no_cuda();
#endif
}

std::size_t decode_attention_scratch_bytes(const Device& device, std::int64_t heads_q,
                                           std::int64_t count, std::int64_t dim) {
  if (!device.is_cuda()) return 0;
#ifdef KVPACK_WITH_CUDA
  return cuda::decode_attention_scratch_bytes(heads_q, count, dim);
#else
  (void)heads_q, (void)count, (void)dim;
  no_cuda();
#endif
}

void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out,
                           const Execution& exec) {
  const Device device = backend_device(keys.device, exec);
  if (!device.is_cuda()) {
    cpu::accumulated_attention(queries, heads_q, window, keys, params, out);
    return;
  }
  require_device(device, keys.device.is_cuda() ? "keys" : "device");
  KVPACK_CHECK(keys.data && queries && out, "queries/keys/out: null pointer");
  KVPACK_CHECK(keys.heads > 0 && keys.tokens > 0 && keys.dim > 0,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache");
  KVPACK_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
               "queries: expected heads_q to be a positive multiple of heads_kv="
                   << keys.heads << ", got " << heads_q);
  KVPACK_CHECK(window > 0 && (!params.causal || window <= keys.tokens),
               "queries: expected 1 <= window <= tokens=" << keys.tokens << ", got " << window);
#ifdef KVPACK_WITH_CUDA
  if (keys.device.is_cuda()) {
    cuda::accumulated_attention(queries, heads_q, window, keys, params, out, exec);
  } else {
    cuda::accumulated_attention_staged(queries, heads_q, window, keys, params, out, exec);
  }
#else
  no_cuda();
#endif
}

void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out,
               const Device& device, const Execution& exec) {
  KVPACK_CHECK(rows && q && scores && out, "rows/q/scores/out: null pointer");
  KVPACK_CHECK(heads >= 1 && n >= 1 && dim >= 1,
               "rows: expected a non-empty [heads, n, dim] array, got [" << heads << ", " << n
                                                                         << ", " << dim << "]");
  KVPACK_CHECK(k >= 1 && k <= n, "k: expected 1 <= k <= n=" << n << ", got " << k);
  const Device backend = backend_device(device, exec);
  if (!backend.is_cuda()) {
    cpu::rank_rows(rows, heads, n, dim, q, k, scores, out);
    return;
  }
  require_device(backend, device.is_cuda() ? "rows" : "device");
#ifdef KVPACK_WITH_CUDA
  if (device.is_cuda()) {
    cuda::rank_rows(rows, heads, n, dim, q, k, scores, out, device.index, exec);
  } else {
    cuda::rank_rows_staged(rows, heads, n, dim, q, k, scores, out, exec);
  }
#else
  no_cuda();
#endif
}

std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids, const Execution& exec) {
  const Device device = backend_device(points.device, exec);
  if (!device.is_cuda()) return cpu::kmeans_heads(points, params, init_centroids);
  require_device(device, points.device.is_cuda() ? "x" : "device");
  KVPACK_CHECK(points.heads >= 1, "points: expected at least one head, got " << points.heads);
#ifdef KVPACK_WITH_CUDA
  // One loop (kvpack::kmeans) over the CUDA backend of each head.
  std::vector<KMeansResult> results;
  const std::int64_t init_stride = params.n_clusters * points.dim;
  for (std::int64_t h = 0; h < points.heads; ++h) {
    const auto backend =
        cuda::kmeans_backend(points.row(h, 0), points.dtype, points.tokens, points.dim,
                             params.spherical, points.device, device.index, exec.stream);
    results.push_back(
        kmeans(*backend, params, init_centroids ? init_centroids + h * init_stride : nullptr));
  }
  return results;
#else
  (void)params, (void)init_centroids;
  no_cuda();
#endif
}

}  // namespace kvpack
