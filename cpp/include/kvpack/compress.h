// One interface for every prefill-time compression method: keep (StreamingLLM, H2O,
// SnapKV, KeyDiff), merge values (CaM) or merge tokens (KVMerger) so that each KV head
// holds exactly `budget` slots, each with the count of tokens it stands for and the
// position it keeps; or, for the methods that rank tokens with `adaptive` set
// (HeadBudgetParams), so that the layer's heads hold heads * budget slots between them.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/methods.h"

namespace kvpack {

/// Parameters of compress: a MethodKind::Compress method with its parameters, and the budget.
struct CompressParams {
  MethodParams method = FullParams{};
  std::int64_t budget = 0;  ///< slots per head, 1 <= budget <= tokens (Full keeps all)
};

/// Where compress writes, [heads, slots, ...] each (slots: compressed_length), C-contiguous.
/// With adaptive head budgets a head keeps its share in its first slots (positions
/// ascending) and leaves the rest empty: position -1, count 0, zero keys and values.
struct CompressOutput {
  void* keys = nullptr;               ///< heads * slots * dim elements of the input dtype
  void* values = nullptr;             ///< same
  std::int32_t* counts = nullptr;     ///< heads * slots
  std::int32_t* positions = nullptr;  ///< heads * slots, ascending per head
  float* thresholds = nullptr;        ///< KVMerger, heads, may be null: lowest similarity merged
};

/// Slots per head compress writes for `heads` heads of `tokens` tokens: the budget, all
/// tokens for Full; with adaptive head budgets the most one head can keep,
/// min(tokens, heads * budget - (heads - 1) * floor), the empty ones included.
std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens,
                               std::int64_t heads);

/// PyramidKV's layer-wise schedule of `layers` compressed layers (the lowest first) for a
/// mean budget per layer of `budget` slots per head over `tokens` tokens: budgets falling
/// linearly from 2 * budget - budget / beta to budget / beta (when the highest would exceed
/// the tokens it is capped there and the lowest raised to keep the mean), rounded so they
/// add up to layers * budget exactly (largest remainders, ties to the lower layer). Every
/// layer gets budget when budget >= tokens, one layer is given, or the lowest would keep
/// less than one slot.
std::vector<std::int64_t> pyramid_budgets(std::int64_t budget, std::int64_t layers,
                                          std::int64_t tokens, double beta);

/// Whether the method splits the layer's budget among its heads (adaptive is set).
bool adaptive_heads(const MethodParams& method);

/// Compresses one layer's cache [heads, tokens, dim]; values has the shape and dtype of
/// keys. Arithmetic in float32; merged rows are written back in the input dtype.
/// @return the most slots one head filled: compressed_length, or with adaptive head
///         budgets the share of the head that kept most (the slots after it are empty
///         in every head)
std::int64_t compress(const KVView& keys, const KVView& values, const Evidence& evidence,
                      const CompressParams& params, const CompressOutput& out);

}  // namespace kvpack
