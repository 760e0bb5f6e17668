#include "kvpack/methods.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvpack {

const char* kind_name(MethodKind kind) {
  switch (kind) {
    case MethodKind::Compress:
      return "compress";
    case MethodKind::Recall:
      return "recall";
    case MethodKind::Quantize:
      return "quantize";
  }
  return "unknown";
}

std::int64_t head_budget_floor(const HeadBudgetParams& params, std::int64_t budget) {
  // In float, as the share is held: 0.7f * 10 is 7, not 6.99999988.
  const auto share = std::floor(params.adaptive_floor * static_cast<float>(budget));
  return std::clamp<std::int64_t>(static_cast<std::int64_t>(share), 1,
                                  std::max<std::int64_t>(budget, 1));
}

void compress_head(const FullParams&, const HeadInput& in, const HeadSlots& out) {
  std::iota(out.positions, out.positions + in.slots, 0);
  keep_rows(in, out);
}

const char* method_name(const MethodParams& method) {
  return std::visit([](const auto& p) { return p.name; }, method);
}

MethodKind method_kind(const MethodParams& method) {
  return std::visit([](const auto& p) { return p.kind; }, method);
}

bool needs_evidence(const MethodParams& method) {
  return std::visit([](const auto& p) { return p.ranks_by_attention || reads_queries(p); }, method);
}

bool needs_queries(const MethodParams& method) {
  return std::visit([](const auto& p) { return reads_queries(p); }, method);
}

std::optional<MethodParams> find_method(const std::string& name) {
  std::optional<MethodParams> found;
  for_each_method([&](const auto& defaults) {
    if (name == defaults.name) found = defaults;
  });
  return found;
}

std::string method_names(std::optional<MethodKind> kind) {
  std::string names;
  for_each_method([&](const auto& p) {
    if (kind && p.kind != *kind) return;
    names += (names.empty() ? "'" : ", '") + std::string(p.name) + "'";
  });
  return names;
}

}  // namespace kvpack
