// AdaptCache's placement: pick one (codec, tier) option per entry so that the summed
// utility freq x (alpha x quality - delay) is high within every tier's capacity, by a
// greedy multiple-choice knapsack on marginal utility per byte.
#pragma once

#include <cstdint>
#include <vector>

namespace kvpack {

/// One way to hold an entry: `bytes` in tier `tier` worth `utility`.
struct PlacementOption {
  int tier = 0;
  std::int64_t bytes = 0;
  double utility = 0.0;
};

/// An entry's options and its rank when not everything fits (higher stays longer).
struct PlacementItem {
  std::vector<PlacementOption> options;
  double priority = 0.0;
};

/// Chooses an option index per item, or -1 for an item that fits nowhere (evicted).
///
/// 1. Items in decreasing priority take their smallest option, in the slowest tier
///    with room (tiers are ordered fastest first); an item with no room is evicted.
/// 2. Then, repeatedly, the upgrade (item, better option) with the highest utility
///    gained per byte it newly occupies in its target tier is applied while it fits;
///    an evicted item that now fits somewhere comes before any upgrade.
/// Every tier's capacity holds at the end; the result is deterministic.
std::vector<int> place(const std::vector<PlacementItem>& items,
                       const std::vector<std::int64_t>& capacities);

}  // namespace kvpack
