// One interface for every prefill-time compression method: keep (StreamingLLM, H2O,
// SnapKV), merge values (CaM) or merge tokens (KVMerger) so that each KV head holds
// exactly `budget` slots, each with the count of tokens it stands for and the position
// it keeps.
#pragma once

#include <cstdint>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/methods.h"

namespace kvpack {

/// Parameters of compress: a MethodKind::Compress method with its parameters, and the budget.
struct CompressParams {
  MethodParams method = FullParams{};
  std::int64_t budget = 0;  ///< slots per head, 1 <= budget <= tokens (Full keeps all)
};

/// Where compress writes, [heads, slots(), ...] each, C-contiguous.
struct CompressOutput {
  void* keys = nullptr;               ///< heads * slots * dim elements of the input dtype
  void* values = nullptr;             ///< same
  std::int32_t* counts = nullptr;     ///< heads * slots
  std::int32_t* positions = nullptr;  ///< heads * slots, ascending per head
  float* thresholds = nullptr;        ///< KVMerger, heads, may be null: lowest similarity merged
};

/// Slots per head compress produces for `tokens` tokens.
std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens);

/// Compresses one layer's cache [heads, tokens, dim]; values has the shape and dtype of
/// keys. Arithmetic in float32; merged rows are written back in the input dtype.
void compress(const KVView& keys, const KVView& values, const Evidence& evidence,
              const CompressParams& params, const CompressOutput& out);

}  // namespace kvpack
