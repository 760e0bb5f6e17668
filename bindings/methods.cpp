// kvpack.methods: one Python class per method of the core's registry (methods.h), made
// from its parameter struct. A class's keywords, defaults, checks and docstring all come
// from the struct's ParamSpecs, so nothing about a method is written here.
#include "methods.h"

#include <pybind11/stl.h>

#include <charconv>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace kvpack::bindings {

namespace {

std::string type_name(const py::handle& h) {
  return py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>();
}

bool is_integer(const py::handle& h) {
  return !py::isinstance<py::bool_>(h) &&
         py::isinstance(h, py::module_::import("numbers").attr("Integral"));
}

bool is_real(const py::handle& h) {
  return !py::isinstance<py::bool_>(h) &&
         py::isinstance(h, py::module_::import("numbers").attr("Real"));
}

// An int in [lowest, highest], compared as a Python int (no overflow on huge values).
std::int64_t to_count(const py::handle& h, const std::string& name, std::int64_t lowest,
                      std::int64_t highest) {
  KVPACK_TYPE_CHECK(is_integer(h), name << ": expected an int, got " << type_name(h));
  const py::int_ big = py::reinterpret_borrow<py::object>(h);
  KVPACK_ARG_CHECK(big.attr("__ge__")(py::int_(lowest)).cast<bool>() &&
                       big.attr("__le__")(py::int_(highest)).cast<bool>(),
                   name << ": expected an int from " << lowest << " to " << highest << ", got "
                        << py::str(big).cast<std::string>());
  return big.cast<std::int64_t>();
}

float to_share(const py::handle& h, const std::string& name) {
  KVPACK_TYPE_CHECK(is_real(h), name << ": expected a number, got " << type_name(h));
  const double share = h.cast<double>();
  KVPACK_ARG_CHECK(share >= 0.0 && share <= 1.0,
                   name << ": expected a share in [0, 1], got " << share);
  return static_cast<float>(share);
}

float to_non_negative(const py::handle& h, const std::string& name) {
  KVPACK_TYPE_CHECK(is_real(h), name << ": expected a number, got " << type_name(h));
  const double number = h.cast<double>();
  KVPACK_ARG_CHECK(
      std::isfinite(number) && number >= 0.0 && std::isfinite(static_cast<float>(number)),
      name << ": expected a finite number >= 0, got " << number);
  return static_cast<float>(number);
}

float to_width(const py::handle& h, const std::string& name) {
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

bool to_flag(const py::handle& h, const std::string& name) {
  KVPACK_TYPE_CHECK(
      py::isinstance<py::bool_>(h) || py::isinstance(h, py::module_::import("numpy").attr("bool_")),
      name << ": expected a bool, got " << type_name(h));
  return h.cast<bool>();
}

// Sets `field` from a Python value by the parameter's rule, naming it on a bad value.
template <class T>
void assign(T& field, const ParamSpec& spec, const py::handle& value) {
  const std::string name = spec.name;
  switch (spec.rule) {
    case ParamRule::Share:
      if constexpr (std::is_floating_point_v<T>) field = to_share(value, name);
      return;
    case ParamRule::NonNegative:
      if constexpr (std::is_floating_point_v<T>) field = to_non_negative(value, name);
      return;
    case ParamRule::OptionalShare:
      if constexpr (std::is_floating_point_v<T>)
        field = value.is_none() ? T(-1) : to_share(value, name);
      return;
    case ParamRule::Width:
      if constexpr (std::is_floating_point_v<T>) field = to_width(value, name);
      return;
    case ParamRule::Flag:
      if constexpr (std::is_same_v<T, bool>) field = to_flag(value, name);
      return;
    case ParamRule::KMeansInit:
      if constexpr (std::is_same_v<T, KMeansInit>) field = parse_init(value, name);
      return;
    default:
      break;
  }
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    constexpr auto most = std::numeric_limits<std::int64_t>::max();
    const auto highest = static_cast<std::int64_t>(
        std::min<std::uint64_t>(static_cast<std::uint64_t>(std::numeric_limits<T>::max()), most));
    if (spec.rule == ParamRule::OptionalCount && value.is_none()) {
      field = 0;
      return;
    }
    const std::int64_t count = to_count(value, name, spec.lowest, highest);
    KVPACK_ARG_CHECK(spec.rule != ParamRule::OddCount || count % 2 == 1,
                     name << ": expected an odd int >= " << spec.lowest << ", got " << count);
    KVPACK_ARG_CHECK(spec.rule != ParamRule::Bits || count == 2 || count == 4 || count == 8,
                     name << ": expected 2, 4 or 8, got " << count);
    field = static_cast<T>(count);
  }
}

// The Python value of `field` by the parameter's rule.
template <class T>
py::object read(const T& field, const ParamSpec& spec) {
  if constexpr (std::is_same_v<T, bool>) {
    return py::bool_(field);
  } else if constexpr (std::is_same_v<T, KMeansInit>) {
    return py::str(init_name(field));
  } else if constexpr (std::is_floating_point_v<T>) {
    if (spec.rule == ParamRule::OptionalShare && field < 0) return py::none();
    if (spec.rule == ParamRule::Width && field <= 0) return py::str("auto");
    // The shortest decimal that reads back as the field (0.2f reads as 0.2, not
    // 0.20000000298023224), so reprs and as_dict() show what was set.
    char text[32];
    const auto end = std::to_chars(text, text + sizeof text, field).ptr;
    return py::float_(std::stod(std::string(text, end)));
  } else {
    if (spec.rule == ParamRule::OptionalCount && field == 0) return py::none();
    return py::int_(field);
  }
}

// How a rule's values read in a docstring and a stub.
const char* rule_type(ParamRule rule) {
  switch (rule) {
    case ParamRule::Count:
    case ParamRule::OddCount:
    case ParamRule::Bits:
      return "int";
    case ParamRule::OptionalCount:
      return "int | None";
    case ParamRule::Share:
    case ParamRule::NonNegative:
      return "float";
    case ParamRule::OptionalShare:
      return "float | None";
    case ParamRule::Width:
      return "float | str";
    case ParamRule::Flag:
      return "bool";
    case ParamRule::KMeansInit:
      return "str";
  }
  return "object";
}

template <class P>
void set_param(P& params, const std::string& name, const py::handle& value) {
  bool found = false;
  std::string takes;
  P::each_param(params, [&](const ParamSpec& spec, auto& field) {
    takes += (takes.empty() ? "" : ", ") + std::string(spec.name);
    if (!found && name == spec.name) {
      assign(field, spec, value);
      found = true;
    }
  });
  KVPACK_TYPE_CHECK(found, name << ": method '" << P::name
                                << "' does not take this parameter; it takes "
                                << (takes.empty() ? "no parameters" : takes));
}

template <class P>
py::dict param_dict(const P& params) {
  py::dict values;
  P::each_param(params, [&](const ParamSpec& spec, const auto& field) {
    values[py::str(spec.name)] = read(field, spec);
  });
  return values;
}

template <class P>
P from_kwargs(const py::dict& kwargs, P params = P{}) {
  for (const auto& [name, value] : kwargs) set_param(params, py::str(name), value);
  return params;
}

// The numpydoc docstring of a method class: its summary and each parameter's default.
template <class P>
std::string class_doc() {
  std::ostringstream doc;
  doc << P::summary << "\n\nParameters\n----------\n";
  const P defaults{};
  bool any = false;
  P::each_param(defaults, [&](const ParamSpec& spec, const auto& field) {
    doc << spec.name << " : " << rule_type(spec.rule) << ", default "
        << py::repr(read(field, spec)).template cast<std::string>() << "\n    " << spec.doc << "\n";
    any = true;
  });
  if (!any) doc << "None.\n";
  return doc.str();
}

// The Python class of one method: keyword construction from the struct's defaults, one
// validated property per parameter, repr, equality, replace and pickling.
template <class P>
void bind_method(py::module_& m) {
  py::class_<P> cls(m, P::class_name);
  cls.doc() = class_doc<P>();
  cls.def(py::init([](const py::args& args, const py::kwargs& kwargs) {
       KVPACK_TYPE_CHECK(args.empty(), P::class_name << " takes its parameters by keyword, got "
                                                     << args.size() << " positional");
       return from_kwargs<P>(kwargs);
     }))
      .def(
          "replace",
          [](const P& self, const py::kwargs& kwargs) { return from_kwargs<P>(kwargs, self); },
          "A copy with the given parameters changed.")
      .def("as_dict", &param_dict<P>, "The parameters as {name: value}.")
      .def("__repr__",
           [](const P& self) {
             std::string text = std::string(P::class_name) + "(";
             bool first = true;
             P::each_param(self, [&](const ParamSpec& spec, const auto& field) {
               text += (first ? "" : ", ") + std::string(spec.name) + "=" +
                       py::repr(read(field, spec)).template cast<std::string>();
               first = false;
             });
             return text + ")";
           })
      .def("__eq__",
           [](const P& self, const py::object& other) {
             return py::isinstance<P>(other) &&
                    param_dict(self).equal(param_dict(other.cast<const P&>()));
           })
      .def("__copy__", [](const P& self) { return self; })
      .def("__deepcopy__", [](const P& self, const py::dict&) { return self; })
      .def(py::pickle([](const P& self) { return param_dict(self); },
                      [](const py::dict& state) { return from_kwargs<P>(state); }));
  py::list names;
  const P defaults{};
  P::each_param(defaults, [&](const ParamSpec& spec, const auto&) {
    const std::string name = spec.name;
    cls.def_property(
        spec.name,
        [name](const P& self) {
          py::object value;
          P::each_param(self, [&](const ParamSpec& s, const auto& f) {
            if (name == s.name) value = read(f, s);
          });
          return value;
        },
        [name](P& self, const py::handle& value) { set_param(self, name, value); },
        (std::string(rule_type(spec.rule)) + ": " + spec.doc).c_str());
    names.append(spec.name);
  });
  cls.attr("__hash__") = py::none();
  cls.attr("__module__") = "kvpack.methods";
  cls.attr("name") = P::name;
  cls.attr("kind") = kind_name(P::kind);
  cls.attr("params") = py::tuple(names);
}

}  // namespace

KMeansInit parse_init(const py::handle& init, const std::string& name) {
  const std::string text = py::isinstance<py::str>(init) ? init.cast<std::string>() : "";
  KVPACK_ARG_CHECK(
      text == "kmeans++" || text == "random",
      name << ": expected 'kmeans++' or 'random', got " << py::repr(init).cast<std::string>());
  return text == "random" ? KMeansInit::Random : KMeansInit::PlusPlus;
}

const char* init_name(KMeansInit init) {
  return init == KMeansInit::Random ? "random" : "kmeans++";
}

MethodParams method_params(const py::handle& method) {
  if (py::isinstance<py::str>(method)) {
    const auto name = method.cast<std::string>();
    const std::optional<MethodParams> found = find_method(name);
    KVPACK_ARG_CHECK(found,
                     "method: expected one of " << method_names() << ", got '" << name << "'");
    return *found;
  }
  std::optional<MethodParams> found;
  for_each_method([&](const auto& defaults) {
    using P = std::decay_t<decltype(defaults)>;
    if (!found && py::isinstance<P>(method)) found = method.cast<const P&>();
  });
  KVPACK_TYPE_CHECK(found, "method: expected a method name or a kvpack.methods object, got "
                               << type_name(method));
  return *found;
}

MethodParams method_params(const py::handle& method, MethodKind kind) {
  MethodParams params = method_params(method);
  const char* what = kind == MethodKind::Compress ? "compression"
                     : kind == MethodKind::Recall ? "recall"
                                                  : "quantization";
  KVPACK_ARG_CHECK(method_kind(params) == kind, "method: expected a "
                                                    << what << " method (" << method_names(kind)
                                                    << "), got '" << method_name(params) << "'");
  return params;
}

std::variant<StreamingLLMParams, H2OParams> eviction_policy(const py::handle& method) {
  const MethodParams params = method_params(method, MethodKind::Compress);
  if (const auto* streaming = std::get_if<StreamingLLMParams>(&params)) return *streaming;
  const auto* h2o = std::get_if<H2OParams>(&params);
  KVPACK_ARG_CHECK(
      h2o, "method: expected 'streaming_llm' or 'h2o', got '" << method_name(params) << "'");
  return *h2o;
}

RecallMethod recall_method(const py::handle& method) {
  const MethodParams params = method_params(method, MethodKind::Recall);
  // A named configuration of ClusterKV (ClusterKVRefined) steps as ClusterKV.
  return std::visit(
      [](const auto& p) -> RecallMethod {
        using P = std::decay_t<decltype(p)>;
        if constexpr (std::is_base_of_v<ClusterKVParams, P>)
          return ClusterKVParams(p);
        else if constexpr (std::is_base_of_v<QuestParams, P>)
          return QuestParams(p);
        else  // method_params checked the kind
          throw std::logic_error("method: a recall method the recall cache cannot run");
      },
      params);
}

void bind_methods(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "methods", "Every method's parameters, one class per method (see kvpack.methods).");
  py::dict registry;  // name -> class, in the core's registry order
  for_each_method([&](const auto& defaults) {
    using P = std::decay_t<decltype(defaults)>;
    bind_method<P>(m);
    registry[py::str(P::name)] = m.attr(P::class_name);
  });
  m.attr("registry") = registry;
}

}  // namespace kvpack::bindings
