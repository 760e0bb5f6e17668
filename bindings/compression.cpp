// Bindings of kvpack/compress.h, merge.h and evict.h: validate, convert, release the
// GIL, call the core.
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>

#include "args.h"
#include "arrays.h"
#include "kvpack/attention.h"
#include "kvpack/compress.h"
#include "kvpack/convert.h"
#include "kvpack/evict.h"
#include "kvpack/merge.h"
#include "methods.h"

namespace kvpack::bindings {

std::int64_t parse_budget(const py::handle& budget, std::int64_t tokens, bool within_context) {
  KVPACK_TYPE_CHECK(!py::isinstance<py::bool_>(budget),
                    "budget: expected a fraction in (0, 1] or a token count, got a bool");
  const py::module_ numbers = py::module_::import("numbers");
  if (py::isinstance(budget, numbers.attr("Integral"))) {
    const py::int_ count = py::reinterpret_borrow<py::object>(budget);
    const std::string given = py::str(count).cast<std::string>();
    if (within_context)
      KVPACK_ARG_CHECK(
          count.attr("__ge__")(py::int_(1)).cast<bool>() &&
              count.attr("__le__")(py::int_(tokens)).cast<bool>(),
          "budget: expected a token count in [1, " << tokens << "] (the context), got " << given);
    else
      KVPACK_ARG_CHECK(
          count.attr("__ge__")(py::int_(1)).cast<bool>() &&
              count.attr("__le__")(py::int_(std::numeric_limits<std::int64_t>::max())).cast<bool>(),
          "budget: expected a token count >= 1, got " << given);
    return count.cast<std::int64_t>();
  }
  KVPACK_TYPE_CHECK(
      py::isinstance(budget, numbers.attr("Real")),
      "budget: expected a fraction in (0, 1] or a token count, got " << python_type(budget));
  const auto fraction = budget.cast<double>();
  KVPACK_ARG_CHECK(std::isfinite(fraction) && fraction > 0.0 && fraction <= 1.0,
                   "budget: expected a fraction in (0, 1] or an int token count, got " << fraction);
  KVPACK_ARG_CHECK(tokens >= 1, "tokens: expected at least 1, got " << tokens);
  return budget_tokens(fraction, tokens);
}

namespace {

// Accumulated attention [heads_kv, tokens] given by the caller, validated.
std::optional<py::array_t<float>> attention_evidence(const py::object& attention,
                                                     const KVView& keys) {
  if (attention.is_none()) return std::nullopt;
  py::array_t<float> scores =
      finite_float32(as_array(attention, "attention"), "attention", 2, "[heads_kv, tokens]");
  KVPACK_ARG_CHECK(scores.shape(0) == keys.heads && scores.shape(1) == keys.tokens,
                   "attention: expected shape (" << keys.heads << ", " << keys.tokens << "), got "
                                                 << shape_string(scores));
  return scores;
}

// Prompt queries [heads_q, window, head_dim], validated against the keys.
std::optional<py::array_t<float>> query_evidence(const py::object& queries, const KVView& keys) {
  if (queries.is_none()) return std::nullopt;
  py::array_t<float> q =
      finite_float32(as_array(queries, "queries"), "queries", 3, "[heads_q, window, head_dim]");
  KVPACK_ARG_CHECK(q.shape(2) == keys.dim, "queries: expected head_dim " << keys.dim
                                                                         << " like keys, got shape "
                                                                         << shape_string(q));
  KVPACK_ARG_CHECK(q.shape(0) > 0 && q.shape(0) % keys.heads == 0,
                   "queries: expected heads_q to be a positive multiple of heads_kv="
                       << keys.heads << ", got shape " << shape_string(q));
  KVPACK_ARG_CHECK(q.shape(1) >= 1 && q.shape(1) <= keys.tokens,
                   "queries: expected 1 to tokens="
                       << keys.tokens << " prompt queries per head, got shape " << shape_string(q));
  return q;
}

// The rotary frequencies [rotary_dim / 2] the queries turn by, validated against the keys.
std::optional<py::array_t<float>> rotary_evidence(const py::object& inv_freq, const KVView& keys) {
  if (inv_freq.is_none()) return std::nullopt;
  py::array_t<float> freq =
      finite_float32(as_array(inv_freq, "inv_freq"), "inv_freq", 1, "[rotary_dim / 2]");
  KVPACK_ARG_CHECK(freq.shape(0) >= 1 && 2 * freq.shape(0) <= keys.dim,
                   "inv_freq: expected 1 to head_dim / 2 = "
                       << keys.dim / 2 << " frequencies, got shape " << shape_string(freq));
  return freq;
}

// The rotation and positions of the queries (Expected Attention reads them).
void parse_rotary(Evidence& e, const std::optional<py::array_t<float>>& inv_freq,
                  const std::optional<double>& scaling,
                  const std::optional<std::int64_t>& first_position) {
  KVPACK_ARG_CHECK(e.queries || (!inv_freq && !scaling && !first_position),
                   "inv_freq, rotary_scaling, first_position: describe the queries; pass "
                   "queries too");
  KVPACK_ARG_CHECK(!scaling || inv_freq, "rotary_scaling: given without inv_freq");
  if (inv_freq) {
    e.rotary.inv_freq = inv_freq->data();
    e.rotary.rotary_dim = 2 * inv_freq->shape(0);
  }
  if (scaling) {
    const auto as_float = static_cast<float>(*scaling);
    KVPACK_ARG_CHECK(
        std::isfinite(*scaling) && *scaling > 0.0 && as_float > 0.0f && std::isfinite(as_float),
        "rotary_scaling: expected a positive number, got " << *scaling);
    e.rotary.scaling = as_float;
  }
  if (first_position) {
    KVPACK_ARG_CHECK(*first_position >= 0,
                     "first_position: expected an int >= 0 or None, got " << *first_position);
    e.first_position = *first_position;
  }
}

// The evidence a method ranks by, from exactly one of queries / attention.
Evidence parse_evidence(const std::optional<py::array_t<float>>& scores,
                        const std::optional<py::array_t<float>>& queries, bool needed,
                        bool only_queries, const std::string& method, float scale) {
  KVPACK_ARG_CHECK(!(scores && queries),
                   "queries, attention: pass one source of evidence, not both");
  KVPACK_ARG_CHECK(!only_queries || queries,
                   "queries: method '"
                       << method
                       << "' models future queries from the prompt's queries; "
                          "pass them [heads_q, window, head_dim]"
                       << (scores ? " (accumulated attention does not serve)" : ""));
  KVPACK_ARG_CHECK(!needed || scores || queries,
                   "queries, attention: method '"
                       << method
                       << "' ranks tokens by attention; pass the prompt's queries [heads_q, "
                          "window, head_dim] or the accumulated attention [heads_kv, tokens]");
  Evidence e;
  e.scale = scale;
  if (scores) e.scores = scores->data();
  if (queries) {
    e.queries = queries->data();
    e.heads_q = queries->shape(0);
    e.window = queries->shape(1);
  }
  return e;
}

// Raises ValueError naming the input holding NaN/Inf when an output row is not finite.
void check_finite_output(const KVView& out_keys, const KVView& out_values, const KVView& keys,
                         const KVView& values) {
  if (first_non_finite_row(out_keys) >= 0 || first_non_finite_row(out_values) >= 0)
    raise_non_finite({{"keys", keys}, {"values", values}},
                     "keys, values: the compressed cache overflows its dtype (merged values grew "
                     "too large); compress in float32");
}

py::dict compress_binding(const py::object& keys_obj, const py::object& values_obj,
                          const py::object& method_obj, const py::object& budget_obj,
                          const py::object& queries_obj, const py::object& attention_obj,
                          const Arg<std::optional<double>>& scale_arg,
                          const py::object& inv_freq_obj,
                          const Arg<std::optional<double>>& rotary_scaling_arg,
                          const Arg<std::optional<std::int64_t>>& first_position_arg) {
  const auto scale = scale_arg.as("scale");
  const auto rotary_scaling = rotary_scaling_arg.as("rotary_scaling");
  const auto first_position = first_position_arg.as("first_position");
  CompressParams params;
  params.method = method_params(method_obj, MethodKind::Compress);
  const py::array keys_arg = as_array(keys_obj, "keys"),
                  values_arg = as_array(values_obj, "values");
  const auto [keys, values] = kv_pair(keys_arg, values_arg);
  params.budget = parse_budget(budget_obj, keys.tokens, /*within_context=*/true);

  const auto scores = attention_evidence(attention_obj, keys);
  const auto queries = query_evidence(queries_obj, keys);
  const auto inv_freq = rotary_evidence(inv_freq_obj, keys);
  Evidence evidence =
      parse_evidence(scores, queries, needs_evidence(params.method), needs_queries(params.method),
                     method_name(params.method), resolve_scale_arg(scale));
  parse_rotary(evidence, inv_freq, rotary_scaling, first_position);
  const std::int64_t slots = compressed_length(params, keys.tokens, keys.heads);
  const std::vector<py::ssize_t> shape{keys.heads, slots, keys.dim};
  py::array out_keys(keys_arg.dtype(), shape), out_values(keys_arg.dtype(), shape);
  py::array_t<std::int32_t> counts({keys.heads, slots}), positions({keys.heads, slots});
  py::array_t<float> thresholds = owned_float_array({keys.heads});
  CompressOutput out{out_keys.mutable_data(), out_values.mutable_data(), counts.mutable_data(),
                     positions.mutable_data(), thresholds.mutable_data()};
  KVView out_k = keys, out_v = values;
  out_k.data = out_keys.data();
  out_v.data = out_values.data();
  out_k.tokens = out_v.tokens = slots;
  out_k.head_stride = out_v.head_stride = 0;
  std::int64_t filled = slots;
  {
    py::gil_scoped_release release;
    filled = compress(keys, values, evidence, params, out);
    check_finite_output(out_k, out_v, keys, values);
  }
  py::dict result;
  result["keys"] = out_keys;
  result["values"] = out_values;
  result["counts"] = counts;
  result["positions"] = positions;
  if (filled < slots) {  // adaptive head budgets: down to the slots some head filled
    const py::module_ np = py::module_::import("numpy");
    const py::tuple first = py::make_tuple(py::slice(), py::slice(0, filled, 1));
    for (const char* name : {"keys", "values", "counts", "positions"})
      result[name] = np.attr("ascontiguousarray")(result[name].attr("__getitem__")(first));
  }
  result["thresholds"] =
      std::holds_alternative<KVMergerParams>(params.method) ? py::object(thresholds) : py::none();
  return result;
}

py::array_t<float> adjacent_similarity_binding(const py::object& keys_obj) {
  const py::array keys_arg = as_array(keys_obj, "keys");
  const KVView keys = kv_view(keys_arg, "keys");
  KVPACK_ARG_CHECK(keys.tokens >= 2,
                   "keys: expected at least 2 tokens, got shape " << shape_string(keys_arg));
  py::array_t<float> out = owned_float_array({keys.heads, keys.tokens - 1});
  {
    py::gil_scoped_release release;
    adjacent_similarity(keys, out.mutable_data());
  }
  if (!all_finite(out.data(), out.size()))
    raise_non_finite({{"keys", keys}},
                     "keys: too large in magnitude (squared norms overflow float32)");
  return out;
}

// A [heads, size, dim] copy of a cache view in its dtype (slots move as tokens are evicted).
py::array copy_view(const KVView& view) {
  py::array out(numpy_dtype(view.dtype),
                std::vector<py::ssize_t>{view.heads, view.tokens, view.dim});
  const std::size_t bytes =
      static_cast<std::size_t>(view.tokens * view.dim) * dtype_size(view.dtype);
  for (std::int64_t h = 0; h < view.heads; ++h)
    if (bytes)
      std::memcpy(static_cast<char*>(out.mutable_data()) + h * bytes, view.row(h, 0), bytes);
  return out;
}

// [heads, size] copy of a per-slot array laid out [heads, capacity].
template <class T>
py::array_t<T> copy_slots(const T* data, std::int64_t heads, std::int64_t size,
                          std::int64_t capacity) {
  py::array_t<T> out({heads, size});
  for (std::int64_t h = 0; h < heads; ++h)
    std::copy(data + h * capacity, data + h * capacity + size, out.mutable_data() + h * size);
  return out;
}

}  // namespace

void bind_compression(py::module_& m) {
  m.def("compress", &compress_binding, py::arg("keys"), py::arg("values"), py::arg("method"),
        py::arg("budget"), py::arg("queries") = py::none(), py::arg("attention") = py::none(),
        py::arg("scale") = py::none(), py::arg("inv_freq") = py::none(),
        py::arg("rotary_scaling") = py::none(), py::arg("first_position") = py::none(),
        "Prefill-time compression; see kvpack.compress.");
  m.def(
      "budget_tokens",
      [](const py::object& budget, const Arg<std::int64_t>& tokens) {
        return parse_budget(budget, tokens.as("tokens"), /*within_context=*/false);
      },
      py::arg("budget"), py::arg("tokens"),
      "Slots a budget stands for over `tokens`: an int token count as given, a float share "
      "of the tokens rounded half up.");
  m.def(
      "pyramid_budgets",
      [](const py::object& budget_obj, const Arg<std::int64_t>& layers_arg,
         const Arg<std::int64_t>& tokens_arg, const Arg<double>& beta_arg) {
        const std::int64_t layers = layers_arg.as("layers"), tokens = tokens_arg.as("tokens");
        const double beta = beta_arg.as("beta");
        KVPACK_ARG_CHECK(layers >= 1, "layers: expected an int >= 1, got " << layers);
        KVPACK_ARG_CHECK(tokens >= 1, "tokens: expected an int >= 1, got " << tokens);
        KVPACK_ARG_CHECK(std::isfinite(beta) && beta >= 1.0,
                         "beta: expected a number >= 1, got " << beta);
        const std::int64_t budget = parse_budget(budget_obj, tokens, /*within_context=*/false);
        return pyramid_budgets(budget, layers, tokens, beta);
      },
      py::arg("budget"), py::arg("layers"), py::arg("tokens"), py::arg("beta"),
      "PyramidKV's budgets per layer; see kvpack.pyramid_budgets.");
  m.def("adjacent_similarity", &adjacent_similarity_binding, py::arg("keys"),
        "Cosine similarity of each key with the next; see kvpack.adjacent_similarity.");

  py::class_<EvictionCache>(m, "EvictionCache")
      .def(py::init([](const py::object& method, const Arg<std::int64_t>& budget_arg,
                       const Arg<std::optional<double>>& scale_arg) {
             const std::int64_t budget = budget_arg.as("budget");
             const auto scale = scale_arg.as("scale");
             KVPACK_ARG_CHECK(budget >= 1, "budget: expected a token count >= 1, got " << budget);
             EvictionCacheParams p;
             p.policy = eviction_policy(method);
             p.budget = budget;
             p.scale = resolve_scale_arg(scale);
             return std::make_unique<EvictionCache>(p);
           }),
           py::arg("method"), py::arg("budget"), py::arg("scale") = py::none())
      .def(
          "prefill",
          [](EvictionCache& self, const py::object& keys_obj, const py::object& values_obj,
             const py::object& queries_obj, const py::object& attention_obj) {
            const py::array keys_arg = as_array(keys_obj, "keys"),
                            values_arg = as_array(values_obj, "values");
            const auto [keys, values] = kv_pair(keys_arg, values_arg);
            require_finite(keys, "keys");
            require_finite(values, "values");
            const bool h2o = std::holds_alternative<H2OParams>(self.params().policy);
            const auto scores = attention_evidence(attention_obj, keys);
            const auto queries = query_evidence(queries_obj, keys);
            const Evidence evidence =
                parse_evidence(scores, queries, h2o, false, "h2o", self.params().scale);
            py::gil_scoped_release release;
            self.prefill(keys, values, evidence);
          },
          py::arg("keys"), py::arg("values"), py::arg("queries") = py::none(),
          py::arg("attention") = py::none())
      .def(
          "step",
          [](EvictionCache& self, const py::object& q, const py::object& key,
             const py::object& value) {
            return decode_step(self, self.heads() > 0, q, key, value);
          },
          py::arg("q"), py::arg("new_key"), py::arg("new_value"))
      .def_property_readonly("size", &EvictionCache::size)
      .def_property_readonly("seen", &EvictionCache::seen)
      .def_property_readonly("budget", [](const EvictionCache& s) { return s.params().budget; })
      .def_property_readonly("keys", [](const EvictionCache& s) { return copy_view(s.keys()); })
      .def_property_readonly("values", [](const EvictionCache& s) { return copy_view(s.values()); })
      .def_property_readonly("positions",
                             [](const EvictionCache& s) {
                               return copy_slots(s.positions(), s.heads(), s.size(), s.capacity());
                             })
      .def_property_readonly("scores", [](const EvictionCache& s) {
        return copy_slots(s.scores(), s.heads(), s.size(), s.capacity());
      });
}

}  // namespace kvpack::bindings
