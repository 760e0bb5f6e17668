// The registry of KV-cache methods: every method kvpack implements, its name and its
// kind. Each method reads one parameter struct, declared beside the code that uses it
// (evict.h, merge.h, cluster_kv.h, quant.h) with its defaults; this file is the one
// place a method's name is written.
#pragma once

#include <string>
#include <vector>

namespace kvpack {

/// A KV-cache method.
enum class Method : int {
  Full = 0,          ///< every token, unchanged (the reference)
  StreamingLLM = 1,  ///< attention sinks + the latest tokens
  H2O = 2,           ///< heavy hitters by accumulated attention + the latest tokens
  SnapKV = 3,        ///< pooled observation-window attention + the window
  CaM = 4,           ///< StreamingLLM's choice, evicted values merged into kept ones
  KVMerger = 5,      ///< adjacent similar keys merged with Gaussian weights
  ClusterKV = 6,     ///< semantic clusters of keys recalled per decode step
  Quest = 7,         ///< pages of keys recalled per decode step by their key bounds
  KIVI = 8,          ///< 2/4/8-bit codes, the latest tokens in full precision
};

/// How a method meets its budget.
enum class MethodKind : int {
  Compress = 0,  ///< at prefill: `budget` slots per KV head kept, merged or dropped
  Recall = 1,    ///< at each decode step: `budget` tokens recalled from the whole cache
  Quantize = 2,  ///< everything kept as low-bit codes, the latest `budget` tokens exact
};

struct MethodInfo {
  Method method;
  const char* name;  ///< the method's name in every API ("snapkv", "clusterkv", ...)
  MethodKind kind;
  bool ranks_by_attention;  ///< needs the prompt's accumulated attention (evidence)
};

/// Every method, in the order they are listed to users.
const std::vector<MethodInfo>& methods();

const MethodInfo& method_info(Method method);

/// The method called `name`, or nullptr.
const MethodInfo* find_method(const std::string& name);

/// "'a', 'b', ..." of the methods of one kind (or all), for error messages.
std::string method_names(const MethodKind* kind = nullptr);

}  // namespace kvpack
