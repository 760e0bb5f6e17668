// The method objects (kvpack.methods): one Python class per method of the core's
// registry, each holding the method's parameter struct. Bindings that run a method take
// one of these objects (or a method's name, for its defaults) and read it here.
#pragma once

#include <string>
#include <variant>

#include "arrays.h"
#include "kvpack/kmeans.h"
#include "kvpack/methods.h"
#include "kvpack/selector.h"

namespace kvpack::bindings {

/// The method `method` stands for: a kvpack.methods object, or a method's name.
MethodParams method_params(const py::handle& method);

/// The same, required to be a method of `kind` (a ValueError naming those otherwise).
MethodParams method_params(const py::handle& method, MethodKind kind);

/// EvictionCache's policy: "streaming_llm" or "h2o" (a name or an object).
std::variant<StreamingLLMParams, H2OParams> eviction_policy(const py::handle& method);

/// The recall engine's method: a recall method of the registry (budget left default).
RecallMethod recall_method(const py::handle& method);

/// k-means initialisation from 'kmeans++' or 'random' (argument `name` in errors).
KMeansInit parse_init(const py::handle& init, const std::string& name);
const char* init_name(KMeansInit init);

void bind_methods(py::module_& m);

}  // namespace kvpack::bindings
