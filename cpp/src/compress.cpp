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

bool needs_evidence(CompressMethod method) {
  return method == CompressMethod::H2O || method == CompressMethod::SnapKV ||
         method == CompressMethod::CaM || method == CompressMethod::KVMerger;
}

std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens) {
  return params.method == CompressMethod::Full ? tokens : params.budget;
}

void compress(const KVView& keys, const KVView& values, const Evidence& evidence,
              const CompressParams& params, const CompressOutput& out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  const std::int64_t slots = compressed_length(params, tokens);
  KVPACK_CHECK(slots >= 1 && slots <= tokens,
               "budget: expected 1 <= budget <= tokens=" << tokens << ", got " << slots);
  // SnapKV observes only the last `window` queries of the prompt.
  const std::vector<float> evidence_copy =
      needs_evidence(params.method)
          ? evidence_scores(keys, evidence,
                            params.method == CompressMethod::SnapKV ? params.window : 0)
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
      case CompressMethod::KVMerger: {
        const float threshold =
            kvmerger_head(keys, values, h, head_scores, slots, params.kvmerger, head);
        if (out.thresholds) out.thresholds[h] = threshold;
        return;
      }
      case CompressMethod::CaM: {
        CaMParams cam;
        cam.sinks = params.sinks;
        cam.merge_window = params.merge_window;
        cam_head(keys, values, h, head_scores, slots, cam, head);
        return;
      }
      case CompressMethod::Full:
        std::iota(head.positions, head.positions + slots, 0);
        break;
      case CompressMethod::StreamingLLM:
        streaming_keep(tokens, slots, params.sinks, head.positions);
        break;
      case CompressMethod::H2O:
        h2o_keep(head_scores, tokens, slots,
                 static_cast<std::int64_t>(std::lround(static_cast<double>(params.recent_ratio) *
                                                       static_cast<double>(slots))),
                 head.positions);
        break;
      case CompressMethod::SnapKV:
        snapkv_keep(head_scores, tokens, slots, params.window, params.kernel, head.positions);
        break;
    }
    gather_rows(keys, h, head.positions, slots, head.keys);
    gather_rows(values, h, head.positions, slots, head.values);
    std::fill(head.counts, head.counts + slots, 1);
  });
}

}  // namespace kvpack
