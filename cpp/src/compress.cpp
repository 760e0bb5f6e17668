#include "kvpack/compress.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/evict.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

namespace {
constexpr MethodKind kCompress = MethodKind::Compress;
}  // namespace

bool needs_evidence(Method method) {
  return method_info(method).ranks_by_attention;
}

std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens) {
  return params.method == Method::Full ? tokens : params.budget;
}

void compress(const KVView& keys, const KVView& values, const Evidence& evidence,
              const CompressParams& params, const CompressOutput& out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  KVPACK_CHECK(method_info(params.method).kind == MethodKind::Compress,
               "method: expected a compression method (" << method_names(&kCompress) << "), got '"
                                                         << method_info(params.method).name << "'");
  const std::int64_t slots = compressed_length(params, tokens);
  KVPACK_CHECK(slots >= 1 && slots <= tokens,
               "budget: expected 1 <= budget <= tokens=" << tokens << ", got " << slots);
  // SnapKV observes only the last `window` queries of the prompt.
  const std::vector<float> evidence_copy =
      needs_evidence(params.method)
          ? evidence_scores(keys, evidence,
                            params.method == Method::SnapKV ? params.snapkv.window : 0)
          : std::vector<float>();
  const float* scores = evidence_copy.data();
  const std::size_t row_bytes = static_cast<std::size_t>(dim) * dtype_size(keys.dtype);

  parallel_for(keys.heads, [&](std::int64_t h) {
    HeadSlots head;
    head.keys = static_cast<char*>(out.keys) + h * slots * row_bytes;
    head.values = static_cast<char*>(out.values) + h * slots * row_bytes;
    head.counts = out.counts + h * slots;
    head.positions = out.positions + h * slots;
    const float* head_scores = needs_evidence(params.method) ? scores + h * tokens : nullptr;
    switch (params.method) {
      case Method::KVMerger: {
        const float threshold =
            kvmerger_head(keys, values, h, head_scores, slots, params.kvmerger, head);
        if (out.thresholds) out.thresholds[h] = threshold;
        return;
      }
      case Method::CaM: {
        cam_head(keys, values, h, head_scores, slots, params.cam, head);
        return;
      }
      case Method::Full:
        std::iota(head.positions, head.positions + slots, 0);
        break;
      case Method::StreamingLLM:
        streaming_keep(tokens, slots, params.streaming_llm.sinks, head.positions);
        break;
      case Method::H2O:
        h2o_keep(head_scores, tokens, slots,
                 static_cast<std::int64_t>(std::lround(
                     static_cast<double>(params.h2o.recent_ratio) * static_cast<double>(slots))),
                 head.positions);
        break;
      case Method::SnapKV:
        snapkv_keep(head_scores, tokens, slots, params.snapkv.window, params.snapkv.kernel,
                    head.positions);
        break;
      default:  // not a compression method: rejected above
        return;
    }
    gather_rows(keys, h, head.positions, slots, head.keys);
    gather_rows(values, h, head.positions, slots, head.values);
    std::fill(head.counts, head.counts + slots, 1);
  });
}

}  // namespace kvpack
