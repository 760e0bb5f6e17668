// Scalar arguments checked where they enter. A binding takes Arg<T> (any Python object
// passes pybind11's overload resolution) and converts it with as("name"), so a value of
// the wrong type, or outside T's range, is a TypeError / ValueError that names the
// argument. Signatures, docstrings and the generated stubs still show T.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace kvpack::bindings {

namespace py = pybind11;

template <class T>
struct is_optional : std::false_type {};
template <class T>
struct is_optional<std::optional<T>> : std::true_type {};
template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

/// What a T is called in an error ("an int", "a number or None", ...).
template <class T>
std::string type_words() {
  if constexpr (std::is_same_v<T, bool>)
    return "a bool";
  else if constexpr (std::is_integral_v<T>)
    return "an int";
  else if constexpr (std::is_floating_point_v<T>)
    return "a number";
  else if constexpr (std::is_same_v<T, std::string>)
    return "a str";
  else if constexpr (std::is_same_v<T, py::bytes>)
    return "bytes";
  else if constexpr (is_optional<T>::value)
    return type_words<typename T::value_type>() + " or None";
  else
    return "a list of " + type_words<typename T::value_type>().substr(2) + "s";
}

/// The Python type name of `h`, for errors.
inline std::string python_type(const py::handle& h) {
  return py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>();
}

/// `given` as a T, or a TypeError / ValueError naming the argument `name`.
template <class T>
T convert(const py::handle& given, const char* name) {
  auto wrong_type = [&]() {
    return py::type_error(std::string(name) + ": expected " + type_words<T>() + ", got " +
                          python_type(given));
  };
  if constexpr (is_optional<T>::value) {
    if (given.is_none()) return std::nullopt;
    try {
      return convert<typename T::value_type>(given, name);
    } catch (const py::type_error&) {
      throw wrong_type();  // "a number or None", not "a number"
    }
  } else if constexpr (std::is_same_v<T, bool>) {
    if (PyBool_Check(given.ptr())) return given.ptr() == Py_True;  // the common case, no lookup
    if (!py::isinstance(given, py::module_::import("numpy").attr("bool_"))) throw wrong_type();
    return given.cast<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (PyLong_CheckExact(given.ptr())) {  // a plain int in range: no lookup, no Python call
      int overflow = 0;
      const long long value = PyLong_AsLongLongAndOverflow(given.ptr(), &overflow);
      if (!overflow && value >= static_cast<long long>(std::numeric_limits<T>::min()) &&
          (value < 0 || static_cast<unsigned long long>(value) <=
                            static_cast<unsigned long long>(std::numeric_limits<T>::max())))
        return static_cast<T>(value);
    }
    if (py::isinstance<py::bool_>(given) ||
        !py::isinstance(given, py::module_::import("numbers").attr("Integral")))
      throw wrong_type();
    const py::int_ value = py::reinterpret_borrow<py::object>(given);
    const py::int_ lowest(std::numeric_limits<T>::min()), highest(std::numeric_limits<T>::max());
    if (value.attr("__lt__")(lowest).cast<bool>() || value.attr("__gt__")(highest).cast<bool>()) {
      std::ostringstream os;
      os << name << ": expected an int from " << py::str(lowest).cast<std::string>() << " to "
         << py::str(highest).cast<std::string>() << ", got " << py::str(value).cast<std::string>();
      throw py::value_error(os.str());
    }
    return value.cast<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (PyFloat_CheckExact(given.ptr())) return static_cast<T>(PyFloat_AS_DOUBLE(given.ptr()));
    if (py::isinstance<py::bool_>(given) ||
        !py::isinstance(given, py::module_::import("numbers").attr("Real")))
      throw wrong_type();
    return given.cast<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!py::isinstance<py::str>(given)) throw wrong_type();
    return given.cast<std::string>();
  } else if constexpr (std::is_same_v<T, py::bytes>) {
    if (!py::isinstance<py::bytes>(given)) throw wrong_type();
    return py::reinterpret_borrow<py::bytes>(given);
  } else {
    static_assert(is_vector<T>::value,
                  "Arg<T>: T is a scalar, a str, bytes, an optional or a list");
    if (py::isinstance<py::str>(given) || py::isinstance<py::bytes>(given) ||
        !py::isinstance<py::sequence>(given))
      throw wrong_type();
    T out;
    for (const py::handle item : given) {
      try {
        out.push_back(convert<typename T::value_type>(item, name));
      } catch (const py::type_error&) {
        throw wrong_type();
      }
    }
    return out;
  }
}

/// A scalar argument as it was given; as("name") converts it (see convert). Hidden
/// like the pybind11 object it holds.
template <class T>
struct __attribute__((visibility("hidden"))) Arg {
  py::object given;
  T as(const char* name) const { return convert<T>(given, name); }
};

/// The slots a budget stands for over `tokens` (the one parser of budgets): an int token
/// count (>= 1, and at most `tokens` when `within_context`) or a share of the tokens in
/// (0, 1] (a float, rounded half up). TypeError / ValueError naming `budget` otherwise.
std::int64_t parse_budget(const py::handle& budget, std::int64_t tokens, bool within_context);

}  // namespace kvpack::bindings

namespace pybind11::detail {

// Arg<T> takes any object and keeps it for the binding to check; it reads as T in
// signatures.
template <class T>
struct type_caster<kvpack::bindings::Arg<T>> {
  PYBIND11_TYPE_CASTER(kvpack::bindings::Arg<T>, make_caster<T>::name);
  bool load(handle src, bool) {
    value.given = reinterpret_borrow<object>(src);
    return true;
  }
  static handle cast(const kvpack::bindings::Arg<T>& src, return_value_policy, handle) {
    return src.given.inc_ref();
  }
};

}  // namespace pybind11::detail
