// One interface for every prefill-time compression method: keep (StreamingLLM, H2O,
// SnapKV), merge values (CaM) or merge tokens (KVMerger) so that each KV head holds
// exactly `budget` slots, each with the count of tokens it stands for and the position
// it keeps.
#pragma once

#include <cstdint>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/merge.h"

namespace kvpack {

/// A prefill-time compression method.
enum class CompressMethod : int {
  Full = 0,          ///< every token, unchanged
  StreamingLLM = 1,  ///< attention sinks + the latest tokens
  H2O = 2,           ///< heavy hitters by accumulated attention + the latest tokens
  SnapKV = 3,        ///< pooled observation-window attention + the window
  CaM = 4,           ///< StreamingLLM's choice, evicted values merged into kept ones
  KVMerger = 5,      ///< adjacent similar keys merged with Gaussian weights
};

/// True for the methods that rank tokens by accumulated attention (evidence).
bool needs_evidence(CompressMethod method);

/// Parameters of compress; each field names the method(s) that read it.
struct CompressParams {
  CompressMethod method = CompressMethod::Full;
  std::int64_t budget = 0;         ///< slots per head, 1 <= budget <= tokens (Full keeps all)
  std::int64_t sinks = 4;          ///< StreamingLLM, CaM: first tokens always kept
  float recent_ratio = 0.5f;       ///< H2O: share of the budget held by the latest tokens
  std::int64_t window = 32;        ///< SnapKV: observation window (queries and kept tokens)
  std::int64_t kernel = 5;         ///< SnapKV: max-pooling width, odd
  std::int64_t merge_window = 32;  ///< CaM: successors an evicted value is spread over
  KVMergerParams kvmerger;
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
