// How a recall method picks the tokens a decode step attends: one interface over
// ClusterKV's clusters and Quest's pages, so that the recall cache appends, selects and
// counts the same way whichever method it runs.
#pragma once

#include <cstdint>
#include <memory>
#include <variant>
#include <vector>

#include "kvpack/cluster_index.h"
#include "kvpack/common.h"
#include "kvpack/quest.h"

namespace kvpack {

/// A recall method: how a RecallCache selects its tokens.
using RecallMethod = std::variant<ClusterKVParams, QuestParams>;

/// What a selector scores per KV head for each query (the cost of a selection besides the
/// top-k and the gather).
struct SelectorStats {
  std::int64_t clusters = 0;  ///< cluster centroids (ClusterKV)
  std::int64_t pages = 0;     ///< page bounds (Quest)
};

/// Selects, for a decode query, the tokens of one layer's cache to attend.
class Selector {
 public:
  virtual ~Selector() = default;

  /// Adds decoded tokens' keys [heads, n, dim] (any KV dtype; each head's rows contiguous).
  virtual void append(const KVView& new_keys) = 0;

  /// Tokens per row that select returns for `budget`: up to `budget`, plus the tokens the
  /// method attends on top of it (ClusterKV's unclustered decoded tokens).
  virtual std::int64_t selection_size(std::int64_t budget) const = 0;

  /// Selects the tokens to attend for the query q [heads_q, dim]. Rows are per KV head (the
  /// group's scores summed) or, when per_query_head, per query head.
  /// @param out  size rows * selection_size(budget), ascending per row
  virtual void select(const float* q, std::int64_t heads_q, std::int64_t budget,
                      bool per_query_head, std::int32_t* out) const = 0;

  /// Tokens every selection of `budget` holds whatever the query, ascending (ClusterKV's
  /// sinks, window and unclustered tokens, Quest's current page); a refined selection
  /// keeps them.
  virtual std::vector<std::int32_t> always_attended(std::int64_t budget) const = 0;

  /// The most tokens a selection will hold on top of min(budget, tokens), so that a fast
  /// tier can be sized once for every selection to come.
  virtual std::int64_t most_on_top() const = 0;

  /// Decoded tokens a cache makes room for at the prefill, so that its first decode steps
  /// do not grow it: until the next clustering (ClusterKV), a few pages (Quest).
  virtual std::int64_t decode_room() const = 0;

  virtual SelectorStats stats() const = 0;
};

/// Throws std::invalid_argument naming the first of the method's own parameters (beyond
/// RecallParams) out of range; make_selector would reject it at the prefill otherwise.
void check_method(const RecallMethod& method);

/// The selector of `method` over a prompt's keys [heads, tokens, dim], read in place.
/// ClusterKV's automatic cluster count is resolved here from the tokens and the budget.
std::unique_ptr<Selector> make_selector(const RecallMethod& method, const KVView& keys);

}  // namespace kvpack
