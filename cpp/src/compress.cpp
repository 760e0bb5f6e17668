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

std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens) {
  return std::holds_alternative<FullParams>(params.method) ? tokens : params.budget;
}

void keep_rows(const HeadInput& in, const HeadSlots& out) {
  gather_rows(in.keys, in.head, out.positions, in.slots, out.keys);
  gather_rows(in.values, in.head, out.positions, in.slots, out.values);
  std::fill(out.counts, out.counts + in.slots, 1);
}

void compress(const KVView& keys, const KVView& values, const Evidence& evidence,
              const CompressParams& params, const CompressOutput& out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  KVPACK_CHECK(method_kind(params.method) == MethodKind::Compress,
               "method: expected a compression method (" << method_names(MethodKind::Compress)
                                                         << "), got '" << method_name(params.method)
                                                         << "'");
  const std::int64_t slots = compressed_length(params, tokens);
  KVPACK_CHECK(slots >= 1 && slots <= tokens,
               "budget: expected 1 <= budget <= tokens=" << tokens << ", got " << slots);
  const bool ranks = needs_evidence(params.method);
  const std::vector<float> scores =
      ranks ? evidence_scores(
                  keys, evidence,
                  std::visit([](const auto& p) { return observation_window(p); }, params.method))
            : std::vector<float>();
  const std::size_t row_bytes = static_cast<std::size_t>(dim) * dtype_size(keys.dtype);

  parallel_for(keys.heads, [&](std::int64_t h) {
    HeadSlots head;
    head.keys = static_cast<char*>(out.keys) + h * slots * row_bytes;
    head.values = static_cast<char*>(out.values) + h * slots * row_bytes;
    head.counts = out.counts + h * slots;
    head.positions = out.positions + h * slots;
    head.threshold = out.thresholds ? out.thresholds + h : nullptr;
    const HeadInput input{keys, values, h, ranks ? scores.data() + h * tokens : nullptr, slots};
    std::visit(
        [&](const auto& method) {
          if constexpr (std::decay_t<decltype(method)>::kind == MethodKind::Compress)
            compress_head(method, input, head);
        },
        params.method);
  });
}

}  // namespace kvpack
