#include "kvpack/methods.h"

#include "kvpack/common.h"

namespace kvpack {

const std::vector<MethodInfo>& methods() {
  static const std::vector<MethodInfo> table = {
      {Method::Full, "full", MethodKind::Compress, false},
      {Method::StreamingLLM, "streaming_llm", MethodKind::Compress, false},
      {Method::H2O, "h2o", MethodKind::Compress, true},
      {Method::SnapKV, "snapkv", MethodKind::Compress, true},
      {Method::CaM, "cam", MethodKind::Compress, true},
      {Method::KVMerger, "kvmerger", MethodKind::Compress, true},
      {Method::ClusterKV, "clusterkv", MethodKind::Recall, false},
      {Method::Quest, "quest", MethodKind::Recall, false},
      {Method::KIVI, "kivi", MethodKind::Quantize, false},
  };
  return table;
}

const MethodInfo& method_info(Method method) {
  for (const MethodInfo& info : methods())
    if (info.method == method) return info;
  KVPACK_CHECK(false, "method: unknown method id " << static_cast<int>(method));
}

const MethodInfo* find_method(const std::string& name) {
  for (const MethodInfo& info : methods())
    if (name == info.name) return &info;
  return nullptr;
}

std::string method_names(const MethodKind* kind) {
  std::string names;
  for (const MethodInfo& info : methods()) {
    if (kind && info.kind != *kind) continue;
    names += (names.empty() ? "'" : ", '") + std::string(info.name) + "'";
  }
  return names;
}

}  // namespace kvpack
