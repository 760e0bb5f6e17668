// The registry of KV-cache methods: the one list of every method kvpack implements.
// A method is its parameter struct (method.h says what one holds), declared beside the
// code that runs it; adding a method is adding its struct to MethodParams below. The
// names, kinds, the Python classes (bindings/methods.cpp) and the store's codecs are
// all read from this list.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <variant>

#include "kvpack/cluster_index.h"
#include "kvpack/evict.h"
#include "kvpack/expected_attention.h"
#include "kvpack/keydiff.h"
#include "kvpack/merge.h"
#include "kvpack/method.h"
#include "kvpack/quant.h"
#include "kvpack/quest.h"

namespace kvpack {

/// No compression: every token kept (the reference).
struct FullParams {
  static constexpr const char* name = "full";
  static constexpr const char* class_name = "Full";
  static constexpr const char* summary = "No compression: every token kept (the reference).";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = 0;

  template <class Self, class F>
  static void each_param(Self&, F&&) {}
};

void compress_head(const FullParams& params, const HeadInput& in, const HeadSlots& out);

/// Every method, in the order they are listed to users: one line a method.
// clang-format off
using MethodParams = std::variant<
    FullParams,
    StreamingLLMParams,
    H2OParams,
    SnapKVParams,
    KeyDiffParams,
    ExpectedAttentionParams,
    CaMParams,
    KVMergerParams,
    ClusterKVParams,
    ClusterKVRefinedParams,
    QuestParams,
    QuantParams>;
// clang-format on

namespace detail {
template <class F, std::size_t... I>
void for_each_method(F& f, std::index_sequence<I...>) {
  (f(std::variant_alternative_t<I, MethodParams>{}), ...);
}
}  // namespace detail

/// Calls f(Params{}) for each method's parameter struct, in registry order.
template <class F>
void for_each_method(F&& f) {
  detail::for_each_method(f, std::make_index_sequence<std::variant_size_v<MethodParams>>{});
}

/// The method's name ("snapkv", ...), kind, whether it ranks tokens by evidence (the
/// attention of the prompt's queries, or the queries themselves) and whether only the
/// queries serve (reads_queries).
const char* method_name(const MethodParams& method);
MethodKind method_kind(const MethodParams& method);
bool needs_evidence(const MethodParams& method);
bool needs_queries(const MethodParams& method);

/// The defaults of the method called `name`, or nothing.
std::optional<MethodParams> find_method(const std::string& name);

/// "'a', 'b', ..." of the methods of one kind (or all), for error messages.
std::string method_names(std::optional<MethodKind> kind = std::nullopt);

}  // namespace kvpack
