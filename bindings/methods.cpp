// One Python class per method, each wrapping the core struct its method reads: the
// defaults are the struct's, each parameter is validated here when it is set, and
// every binding that runs a method reads its parameters through this file.
#include "methods.h"

#include <pybind11/stl.h>

#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvpack::bindings {

namespace {

// A method object: the parameters of method M, held in the core's struct.
template <Method M, class Params>
struct MethodObject {
  static constexpr Method method = M;
  Params params;
};

struct NoParams {};

using FullObject = MethodObject<Method::Full, NoParams>;
using StreamingLLMObject = MethodObject<Method::StreamingLLM, StreamingLLMParams>;
using H2OObject = MethodObject<Method::H2O, H2OParams>;
using SnapKVObject = MethodObject<Method::SnapKV, SnapKVParams>;
using CaMObject = MethodObject<Method::CaM, CaMParams>;
using KVMergerObject = MethodObject<Method::KVMerger, KVMergerParams>;
using ClusterKVObject = MethodObject<Method::ClusterKV, ClusterKVParams>;
using QuestObject = MethodObject<Method::Quest, ClusterKVParams>;
using KIVIObject = MethodObject<Method::KIVI, QuantParams>;

// Calls f(object) with the method object `h` holds, typed; false when it holds none.
template <class F>
bool visit(const py::handle& h, F&& f) {
  auto as = [&](auto* tag) {
    using Object = std::remove_pointer_t<decltype(tag)>;
    if (!py::isinstance<Object>(h)) return false;
    f(h.cast<const Object&>());
    return true;
  };
  return as(static_cast<FullObject*>(nullptr)) || as(static_cast<StreamingLLMObject*>(nullptr)) ||
         as(static_cast<H2OObject*>(nullptr)) || as(static_cast<SnapKVObject*>(nullptr)) ||
         as(static_cast<CaMObject*>(nullptr)) || as(static_cast<KVMergerObject*>(nullptr)) ||
         as(static_cast<ClusterKVObject*>(nullptr)) || as(static_cast<QuestObject*>(nullptr)) ||
         as(static_cast<KIVIObject*>(nullptr));
}

std::string type_name(const py::handle& h) {
  return py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>();
}

// --- Parameter conversions: Python value <-> core field, validated, naming the parameter.

bool is_integer(const py::handle& h) {
  return !py::isinstance<py::bool_>(h) &&
         py::isinstance(h, py::module_::import("numbers").attr("Integral"));
}

bool is_real(const py::handle& h) {
  return !py::isinstance<py::bool_>(h) &&
         py::isinstance(h, py::module_::import("numbers").attr("Real"));
}

// An int in [lowest, highest] (counts the core clamps to the context may be huge).
std::int64_t to_count(const py::handle& h, const std::string& name, std::int64_t lowest,
                      std::int64_t highest = std::numeric_limits<std::int64_t>::max()) {
  KVPACK_TYPE_CHECK(is_integer(h), name << ": expected an int, got " << type_name(h));
  const py::int_ big = py::reinterpret_borrow<py::object>(h);
  KVPACK_ARG_CHECK(big.attr("__ge__")(py::int_(lowest)).cast<bool>() &&
                       big.attr("__le__")(py::int_(highest)).cast<bool>(),
                   name << ": expected an int from " << lowest << " to " << highest << ", got "
                        << py::str(big).cast<std::string>());
  return big.cast<std::int64_t>();
}

double to_real(const py::handle& h, const std::string& name) {
  KVPACK_TYPE_CHECK(is_real(h), name << ": expected a number, got " << type_name(h));
  return h.cast<double>();
}

float to_share(const py::handle& h, const std::string& name) {
  const double share = to_real(h, name);
  KVPACK_ARG_CHECK(share >= 0.0 && share <= 1.0,
                   name << ": expected a share in [0, 1], got " << share);
  return static_cast<float>(share);
}

bool to_flag(const py::handle& h, const std::string& name) {
  KVPACK_TYPE_CHECK(
      py::isinstance<py::bool_>(h) || py::isinstance(h, py::module_::import("numpy").attr("bool_")),
      name << ": expected a bool, got " << type_name(h));
  return h.cast<bool>();
}

template <class T>
py::object as_object(T&& value) {
  if constexpr (std::is_base_of_v<py::handle, std::decay_t<T>>)
    return py::reinterpret_borrow<py::object>(value);
  else
    return py::cast(std::forward<T>(value));
}

// A parameter of a method class: its name, how to read it, how to set it.
template <class Object>
struct Param {
  std::string name;
  std::function<py::object(const Object&)> get;
  std::function<void(Object&, const py::handle&)> set;
};

template <class Object>
std::vector<Param<Object>>& params_of() {
  static std::vector<Param<Object>> params;
  return params;
}

template <class Object>
void set_param(Object& object, const py::str& key, const py::handle& value) {
  const auto name = key.cast<std::string>();
  for (const Param<Object>& param : params_of<Object>())
    if (param.name == name) return param.set(object, value);
  std::string takes;
  for (const Param<Object>& param : params_of<Object>())
    takes += (takes.empty() ? "" : ", ") + param.name;
  KVPACK_TYPE_CHECK(false, name << ": method '" << method_info(Object::method).name
                                << "' does not take this parameter; it takes "
                                << (takes.empty() ? "no parameters" : takes));
}

template <class Object>
py::dict param_dict(const Object& object) {
  py::dict values;
  for (const Param<Object>& param : params_of<Object>())
    values[py::str(param.name)] = param.get(object);
  return values;
}

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

// The Python class of one method: keyword construction from the struct's defaults,
// one validated property per parameter, repr, equality, replace and pickling.
template <class Object>
class MethodClass {
 public:
  MethodClass(py::module_& m, const char* class_name, const char* doc) : cls_(m, class_name, doc) {
    const MethodInfo& info = method_info(Object::method);
    cls_.def(py::init([class_name](const py::args& args, const py::kwargs& kwargs) {
          KVPACK_TYPE_CHECK(args.empty(), class_name << " takes its parameters by keyword, got "
                                                     << args.size() << " positional");
          Object object;
          for (const auto& [name, value] : kwargs) set_param(object, py::str(name), value);
          return object;
        }))
        .def(
            "replace",
            [](const Object& self, const py::kwargs& kwargs) {
              Object object = self;
              for (const auto& [name, value] : kwargs) set_param(object, py::str(name), value);
              return object;
            },
            "A copy with the given parameters changed.")
        .def("as_dict", &param_dict<Object>, "The parameters as {name: value}.")
        .def("__repr__",
             [class_name](const Object& self) {
               std::string text = std::string(class_name) + "(";
               bool first = true;
               for (const Param<Object>& param : params_of<Object>()) {
                 text += (first ? "" : ", ") + param.name + "=" +
                         py::repr(param.get(self)).template cast<std::string>();
                 first = false;
               }
               return text + ")";
             })
        .def("__eq__",
             [](const Object& self, const py::object& other) {
               return py::isinstance<Object>(other) &&
                      param_dict(self).equal(param_dict(other.cast<const Object&>()));
             })
        .def("__copy__", [](const Object& self) { return self; })
        .def("__deepcopy__", [](const Object& self, const py::dict&) { return self; })
        .def(py::pickle([](const Object& self) { return param_dict(self); },
                        [](const py::dict& state) {
                          Object object;
                          for (const auto& [name, value] : state)
                            set_param(object, py::str(name), value);
                          return object;
                        }));
    cls_.attr("__hash__") = py::none();
    cls_.attr("__module__") = "kvpack.methods";
    cls_.attr("name") = info.name;
    cls_.attr("kind") = kind_name(info.kind);
  }

  // A parameter stored in the field `field(params)` returns, converted by to_core
  // (Python -> field, validating) and to_python (field -> Python).
  template <class Field, class ToCore, class ToPython>
  MethodClass& param(const char* name, Field field, ToCore to_core, ToPython to_python,
                     const char* doc) {
    const std::string key = name;
    Param<Object> param{
        key, [field, to_python](const Object& o) { return as_object(to_python(field(o.params))); },
        [field, to_core, key](Object& o, const py::handle& value) {
          auto& target = field(o.params);
          target = static_cast<std::remove_reference_t<decltype(target)>>(to_core(value, key));
        }};
    params_of<Object>().push_back(param);
    cls_.def_property(
        name, [param](const Object& o) { return param.get(o); },
        [param](Object& o, const py::handle& value) { param.set(o, value); }, doc);
    return *this;
  }

  // Shorthands for the common kinds of parameter.
  template <class Field>
  MethodClass& count(const char* name, Field field, std::int64_t lowest, const char* doc) {
    using T = std::remove_reference_t<decltype(field(std::declval<decltype(Object::params)&>()))>;
    const auto highest = static_cast<std::int64_t>(std::numeric_limits<T>::max());
    return param(
        name, field,
        [lowest, highest](const py::handle& h, const std::string& n) {
          return to_count(h, n, lowest, highest);
        },
        [](std::int64_t v) { return v; }, doc);
  }
  template <class Field>
  MethodClass& share(const char* name, Field field, const char* doc) {
    return param(
        name, field, &to_share, [](float v) { return static_cast<double>(v); }, doc);
  }
  template <class Field>
  MethodClass& flag(const char* name, Field field, const char* doc) {
    return param(
        name, field, &to_flag, [](bool v) { return v; }, doc);
  }

  void done() {
    py::tuple names(params_of<Object>().size());
    for (std::size_t i = 0; i < params_of<Object>().size(); ++i)
      names[i] = params_of<Object>()[i].name;
    cls_.attr("params") = names;
  }

 private:
  py::class_<Object> cls_;
};

// Field accessors: a lambda returning the field of the struct by reference.
#define KVPACK_FIELD(path) \
  [](auto& p) -> auto& {   \
    return p.path;         \
  }

// KVMerger's protected shares: a share, or None for the paper's schedule (-1 in the core).
float to_optional_share(const py::handle& h, const std::string& name) {
  return h.is_none() ? -1.0f : to_share(h, name);
}
py::object from_optional_share(float share) {
  return share < 0.0f ? py::none() : py::object(py::float_(static_cast<double>(share)));
}

// KVMerger's kernel width: a positive number, or "auto" (0 in the core: per merged run).
float to_sigma(const py::handle& h, const std::string& name) {
  if (py::isinstance<py::str>(h)) {
    const auto text = h.cast<std::string>();
    KVPACK_ARG_CHECK(text == "auto",
                     name << ": expected a positive width or 'auto', got '" << text << "'");
    return 0.0f;
  }
  KVPACK_ARG_CHECK(is_real(h),
                   name << ": expected a positive width or 'auto', got " << type_name(h));
  const double width = h.cast<double>();
  KVPACK_ARG_CHECK(std::isfinite(width) && width > 0.0,
                   name << ": expected a positive width or 'auto', got " << width);
  return static_cast<float>(width);
}
py::object from_sigma(float sigma) {
  return sigma <= 0.0f ? py::object(py::str("auto")) : py::object(py::float_(sigma));
}

// ClusterKV's cluster count: a count, or None (or 0) for automatic (0 in the core).
std::int64_t to_clusters(const py::handle& h, const std::string& name) {
  return h.is_none() ? 0 : to_count(h, name, 0);
}
py::object from_clusters(std::int64_t n) {
  return n == 0 ? py::none() : py::object(py::int_(n));
}

KMeansInit to_init(const py::handle& h, const std::string& name) {
  const std::string text = py::isinstance<py::str>(h) ? h.cast<std::string>() : "";
  KVPACK_ARG_CHECK(
      text == "kmeans++" || text == "random",
      name << ": expected 'kmeans++' or 'random', got " << py::repr(h).cast<std::string>());
  return text == "random" ? KMeansInit::Random : KMeansInit::PlusPlus;
}
const char* from_init(KMeansInit init) {
  return init == KMeansInit::Random ? "random" : "kmeans++";
}

int to_bits(const py::handle& h, const std::string& name) {
  const std::int64_t bits = to_count(h, name, 1);
  KVPACK_ARG_CHECK(bits == 2 || bits == 4 || bits == 8,
                   name << ": expected 2, 4 or 8, got " << bits);
  return static_cast<int>(bits);
}

template <class Object>
void recall_common(MethodClass<Object>& cls) {
  cls.count("recall_steps", KVPACK_FIELD(recall_steps), 1,
            "R: tokens recalled in the last R steps stay in the fast tier.")
      .flag("per_query_head", KVPACK_FIELD(per_query_head),
            "Each query head selects its own tokens (GQA) instead of one set per KV head.")
      .flag("fast_tier", KVPACK_FIELD(fast_tier),
            "Copy recalled tokens into a fast tier kept for R steps (False: attend in place).");
}

}  // namespace

Method method_of(const py::handle& method) {
  if (py::isinstance<py::str>(method)) {
    const auto name = method.cast<std::string>();
    const MethodInfo* info = find_method(name);
    KVPACK_ARG_CHECK(info,
                     "method: expected one of " << method_names() << ", got '" << name << "'");
    return info->method;
  }
  Method found = Method::Full;
  const bool known = visit(method, [&](const auto& object) { found = object.method; });
  KVPACK_TYPE_CHECK(known, "method: expected a method name or a kvpack.methods object, got "
                               << type_name(method));
  return found;
}

namespace {

// The object `method` stands for, a name becoming the method's defaults.
py::object method_object(const py::handle& method) {
  if (!py::isinstance<py::str>(method)) {
    method_of(method);  // a method object, or a TypeError
    return py::reinterpret_borrow<py::object>(method);
  }
  const char* name = method_info(method_of(method)).name;
  return py::module_::import("kvpack._core").attr("methods").attr("registry")[py::str(name)]();
}

void require_kind(Method method, MethodKind kind, const char* what) {
  KVPACK_ARG_CHECK(method_info(method).kind == kind,
                   "method: expected " << what << " (" << method_names(&kind) << "), got '"
                                       << method_info(method).name << "'");
}

}  // namespace

CompressParams compress_params(const py::handle& method) {
  const py::object object = method_object(method);
  CompressParams params;
  params.method = method_of(object);
  require_kind(params.method, MethodKind::Compress, "a compression method");
  visit(object, [&](const auto& o) {
    using Object = std::decay_t<decltype(o)>;
    if constexpr (std::is_same_v<Object, StreamingLLMObject>) params.streaming_llm = o.params;
    if constexpr (std::is_same_v<Object, H2OObject>) params.h2o = o.params;
    if constexpr (std::is_same_v<Object, SnapKVObject>) params.snapkv = o.params;
    if constexpr (std::is_same_v<Object, CaMObject>) params.cam = o.params;
    if constexpr (std::is_same_v<Object, KVMergerObject>) params.kvmerger = o.params;
  });
  return params;
}

EvictionCacheParams eviction_params(const py::handle& method) {
  const CompressParams compress = compress_params(method);
  KVPACK_ARG_CHECK(compress.method == Method::StreamingLLM || compress.method == Method::H2O,
                   "method: expected 'streaming_llm' or 'h2o', got '"
                       << method_info(compress.method).name << "'");
  EvictionCacheParams params;
  params.policy = compress.method;
  params.streaming_llm = compress.streaming_llm;
  params.h2o = compress.h2o;
  return params;
}

ClusterKVParams recall_params(const py::handle& method) {
  const py::object object = method_object(method);
  const Method m = method_of(object);
  require_kind(m, MethodKind::Recall, "a recall method");
  ClusterKVParams params;
  visit(object, [&](const auto& o) {
    using Object = std::decay_t<decltype(o)>;
    if constexpr (std::is_same_v<Object, ClusterKVObject> || std::is_same_v<Object, QuestObject>)
      params = o.params;
  });
  params.method = m;
  return params;
}

QuantParams kivi_params(const py::handle& method) {
  const py::object object = method_object(method);
  require_kind(method_of(object), MethodKind::Quantize, "a quantization method");
  QuantParams params;
  visit(object, [&](const auto& o) {
    if constexpr (std::is_same_v<std::decay_t<decltype(o)>, KIVIObject>) params = o.params;
  });
  return params;
}

void bind_methods(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "methods", "Every method's parameters, one class per method (see kvpack.methods).");

  MethodClass<FullObject>(m, "Full", "No compression: every token kept (the reference).").done();
  MethodClass<StreamingLLMObject>(m, "StreamingLLM",
                                  "StreamingLLM: the attention sinks and the latest tokens.")
      .count("sinks", KVPACK_FIELD(sinks), 0, "First tokens always kept.")
      .done();
  MethodClass<H2OObject>(m, "H2O",
                         "H2O: the heavy hitters by accumulated attention and the latest tokens.")
      .share("recent_ratio", KVPACK_FIELD(recent_ratio),
             "Share of the budget held by the latest tokens.")
      .done();
  MethodClass<SnapKVObject>(
      m, "SnapKV",
      "SnapKV: the tokens the observation window attends most (max-pooled), and the window.")
      .count("window", KVPACK_FIELD(window), 1, "Observation window: the prompt's last queries.")
      .param(
          "kernel", KVPACK_FIELD(kernel),
          [](const py::handle& h, const std::string& name) {
            const std::int64_t kernel = to_count(h, name, 1);
            KVPACK_ARG_CHECK(kernel % 2 == 1,
                             name << ": expected an odd pooling width >= 1, got " << kernel);
            return kernel;
          },
          [](std::int64_t v) { return v; }, "Max-pooling width over neighbouring tokens (odd).")
      .done();
  MethodClass<CaMObject>(m, "CaM",
                         "CaM: StreamingLLM's choice, each evicted value merged into the kept "
                         "ones with the probability its attention gives.")
      .count("sinks", KVPACK_FIELD(sinks), 0, "First tokens always kept.")
      .count("merge_window", KVPACK_FIELD(merge_window), 1,
             "Successors an evicted value is spread over.")
      .done();
  MethodClass<KVMergerObject>(
      m, "KVMerger", "KVMerger: runs of adjacent similar keys merged with Gaussian weights.")
      .param("protect_recent", KVPACK_FIELD(protect_recent), &to_optional_share,
             &from_optional_share,
             "Share of the tokens in the never-merged recent window (None: the paper's "
             "schedule, 17% at a 50% budget to 8% at 35%).")
      .param("protect_heavy", KVPACK_FIELD(protect_heavy), &to_optional_share, &from_optional_share,
             "Share of the tokens protected as heavy hitters (None: 12% at 50% to 2% at 35%).")
      .param("sigma", KVPACK_FIELD(sigma), &to_sigma, &from_sigma,
             "Gaussian kernel width, or 'auto': per run, the RMS member-pivot distance.")
      .done();

  MethodClass<ClusterKVObject> clusterkv(
      m, "ClusterKV",
      "ClusterKV: keys clustered by cosine k-means; each decode step recalls whole "
      "clusters until the budget is filled.");
  clusterkv
      .param("n_clusters", KVPACK_FIELD(index.n_clusters), &to_clusters, &from_clusters,
             "Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, "
             "raised so the mean cluster holds at most budget / 12 tokens).")
      .count("tokens_per_cluster", KVPACK_FIELD(index.tokens_per_cluster), 1,
             "Mean cluster size the automatic n_clusters aims at.")
      .count("sink", KVPACK_FIELD(index.sink), 0, "First tokens never clustered, always attended.")
      .count("window", KVPACK_FIELD(window), 0, "Most recent tokens always attended.")
      .count("iters", KVPACK_FIELD(index.iterations), 1, "k-means rounds.")
      .param(
          "seed", KVPACK_FIELD(index.seed),
          [](const py::handle& h, const std::string& name) {
            return static_cast<std::uint64_t>(to_count(h, name, 0));
          },
          [](std::uint64_t v) { return v; }, "k-means seed.")
      .param("init", KVPACK_FIELD(index.init), &to_init, &from_init,
             "k-means initialisation: 'kmeans++' or 'random'.")
      .count("append_interval", KVPACK_FIELD(index.append_interval), 1,
             "Decoded tokens clustered together (m).")
      .count("append_clusters", KVPACK_FIELD(index.append_clusters), 1,
             "Clusters made of them (C+).");
  recall_common(clusterkv);
  clusterkv.done();

  MethodClass<QuestObject> quest(
      m, "Quest", "Quest: pages of keys recalled per decode step by their per-channel bounds.");
  quest.count("page_size", KVPACK_FIELD(page_size), 1, "Tokens per page.");
  recall_common(quest);
  quest.done();

  MethodClass<KIVIObject>(
      m, "KIVI",
      "KIVI: keys quantized per channel and values per token to 2, 4 or 8 bits; the latest "
      "budget tokens kept in full precision.")
      .param(
          "bits", KVPACK_FIELD(bits), &to_bits, [](int v) { return v; }, "2, 4 or 8.")
      .count("group", KVPACK_FIELD(group), 1, "Tokens per key group and channels per value group.")
      .done();

  // name -> class, in the order of the core's method table.
  py::dict registry;
  for (const MethodInfo& info : methods())
    for (const char* class_name :
         {"Full", "StreamingLLM", "H2O", "SnapKV", "CaM", "KVMerger", "ClusterKV", "Quest", "KIVI"})
      if (m.attr(class_name).attr("name").cast<std::string>() == info.name)
        registry[py::str(info.name)] = m.attr(class_name);
  m.attr("registry") = registry;
}

}  // namespace kvpack::bindings
