// The method objects (kvpack.methods): one Python class per method, each holding the
// core struct its method reads. Bindings that run a method take one of these objects
// (or a method's name, for its defaults) and read the core parameters from it here.
#pragma once

#include "arrays.h"
#include "kvpack/cluster_kv.h"
#include "kvpack/compress.h"
#include "kvpack/evict.h"
#include "kvpack/methods.h"
#include "kvpack/quant.h"

namespace kvpack::bindings {

/// The method `method` stands for: a kvpack.methods object, or a method's name.
Method method_of(const py::handle& method);

/// compress's parameters from a compression method (budget left 0).
CompressParams compress_params(const py::handle& method);

/// EvictionCache's parameters from "streaming_llm" or "h2o" (budget and scale left default).
EvictionCacheParams eviction_params(const py::handle& method);

/// ClusterKV's parameters from a recall method, "clusterkv" or "quest" (budget left default).
ClusterKVParams recall_params(const py::handle& method);

/// KIVI's parameters (residual left default).
QuantParams kivi_params(const py::handle& method);

void bind_methods(py::module_& m);

}  // namespace kvpack::bindings
