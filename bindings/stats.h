// A core stats struct (StoreStats, TierStats, RecallStats, ...) as the dict Python sees: a
// binding lists the struct's fields once, each a key and the member it reads, and one
// template writes them; entries computed from several fields are added to the result.
#pragma once

#include <pybind11/pybind11.h>

namespace kvpack::bindings {

namespace py = pybind11;

/// One field of a stats struct: the key Python sees and the member it reads.
template <class Stats, class T>
struct StatsField {
  const char* key;
  T Stats::*member;
};

/// A field of `Stats` for stats_dict, e.g. `field("bytes", &TierStats::used)`.
template <class Stats, class T>
constexpr StatsField<Stats, T> field(const char* key, T Stats::*member) {
  return {key, member};
}

/// Adds `key: stats.*member` to `out` for each of `fields`, in their order.
template <class Stats, class... T>
void add_stats(py::dict& out, const Stats& stats, const StatsField<Stats, T>&... fields) {
  ((out[fields.key] = stats.*(fields.member)), ...);
}

/// The dict `{key: stats.*member}` of `fields`, in their order.
template <class Stats, class... T>
py::dict stats_dict(const Stats& stats, const StatsField<Stats, T>&... fields) {
  py::dict out;
  add_stats(out, stats, fields...);
  return out;
}

}  // namespace kvpack::bindings
