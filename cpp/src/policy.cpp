#include "kvpack/policy.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "kvpack/common.h"

namespace kvpack {

std::vector<int> place(const std::vector<PlacementItem>& items,
                       const std::vector<std::int64_t>& capacities) {
  const int tiers = static_cast<int>(capacities.size());
  for (const PlacementItem& item : items)
    for (const PlacementOption& option : item.options)
      KVPACK_CHECK(option.tier >= 0 && option.tier < tiers && option.bytes >= 0,
                   "options: tier in [0, " << tiers << ") and bytes >= 0 expected, got tier "
                                           << option.tier << ", bytes " << option.bytes);
  std::vector<std::int64_t> free(capacities);
  std::vector<int> choice(items.size(), -1);

  // 1. Smallest option of each item, slowest tier with room, by decreasing priority.
  std::vector<std::size_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return items[a].priority > items[b].priority;
  });
  for (const std::size_t i : order) {
    int best = -1;
    for (int o = 0; o < static_cast<int>(items[i].options.size()); ++o) {
      const PlacementOption& option = items[i].options[o];
      if (option.bytes > free[option.tier]) continue;
      if (best < 0) {
        best = o;
        continue;
      }
      const PlacementOption& current = items[i].options[best];
      if (option.bytes < current.bytes ||
          (option.bytes == current.bytes &&
           (option.tier > current.tier ||
            (option.tier == current.tier && option.utility > current.utility))))
        best = o;
    }
    if (best >= 0) {
      choice[i] = best;
      free[items[i].options[best].tier] -= items[i].options[best].bytes;
    }
  }

  // 2. Greedy upgrades by utility gained per newly occupied byte. A move is ranked by
  // (gain, priority, fewer bytes); placing an evicted item ranks above everything and a
  // free upgrade (no new bytes) above any paid one.
  struct Rank {
    double gain = -1.0, priority = 0.0;
    std::int64_t bytes = 0;
    bool operator>(const Rank& other) const {
      if (gain != other.gain) return gain > other.gain;
      if (priority != other.priority) return priority > other.priority;
      return bytes < other.bytes;
    }
  };
  constexpr double kPlace = std::numeric_limits<double>::infinity();
  constexpr double kFree = std::numeric_limits<double>::max();
  for (;;) {
    std::size_t best_item = items.size();
    int best_option = -1;
    Rank best;
    for (std::size_t i = 0; i < items.size(); ++i) {
      const int current = choice[i];
      for (int o = 0; o < static_cast<int>(items[i].options.size()); ++o) {
        if (o == current) continue;
        const PlacementOption& option = items[i].options[o];
        std::int64_t room = free[option.tier];
        if (current >= 0 && items[i].options[current].tier == option.tier)
          room += items[i].options[current].bytes;
        if (option.bytes > room) continue;
        Rank rank{kPlace, items[i].priority, option.bytes};
        if (current >= 0) {
          const PlacementOption& now = items[i].options[current];
          const double delta = option.utility - now.utility;
          if (!(delta > 0.0)) continue;
          const std::int64_t added =
              option.bytes - (now.tier == option.tier ? now.bytes : std::int64_t{0});
          rank.gain = added > 0 ? delta / static_cast<double>(added) : kFree;
        }
        if (rank > best) {
          best_item = i;
          best_option = o;
          best = rank;
        }
      }
    }
    if (best_item == items.size()) break;
    const int current = choice[best_item];
    if (current >= 0) {
      const PlacementOption& now = items[best_item].options[current];
      free[now.tier] += now.bytes;
    }
    const PlacementOption& next = items[best_item].options[best_option];
    free[next.tier] -= next.bytes;
    choice[best_item] = best_option;
  }
  return choice;
}

}  // namespace kvpack
