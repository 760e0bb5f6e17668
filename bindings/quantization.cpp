// Bindings of kvpack/quant.h: validate, convert, release the GIL, call the core.
#include <pybind11/stl.h>

#include "args.h"
#include "arrays.h"
#include "kvpack/quant.h"

namespace kvpack::bindings {

namespace {

py::array_t<float> quantized_attention_binding(
    const py::object& quantized_obj, const py::object& queries_obj, const py::object& tail_keys_obj,
    const py::object& tail_values_obj, const Arg<std::optional<double>>& scale_arg,
    const Arg<std::optional<double>>& softcap_arg, const py::object& sinks_obj) {
  // Each query reads a prefix of its row's tail as [heads, n, head_dim]: head rows contiguous.
  const BatchStep step =
      batch_step(queries_obj, tail_keys_obj, tail_values_obj, "tail_keys", "tail_values", true);
  const py::array_t<float>& queries = step.queries;
  const py::array& keys_array = step.keys_array;
  const BatchKVView &keys = step.keys, &values = step.values;
  const std::int64_t batch = step.batch, fresh = step.fresh, heads_q = step.heads_q;
  KVPACK_ARG_CHECK(keys.tokens >= fresh,
                   "tail_keys: expected at least new=" << fresh
                                                       << " decoded tokens (query i attends the "
                                                          "first decoded - new + i + 1), got "
                                                       << shape_string(keys_array));
  std::vector<py::object> keep;
  const std::vector<QuantizedKV*> quantized =
      batch_objects<QuantizedKV>(quantized_obj, "quantized", "QuantizedKV", batch, "queries", keep);
  for (std::size_t b = 0; b < quantized.size(); ++b)
    KVPACK_ARG_CHECK(quantized[b]->heads() == keys.heads && quantized[b]->dim() == keys.dim,
                     "tail_keys: expected heads_kv "
                         << quantized[b]->heads() << " and head_dim " << quantized[b]->dim()
                         << " like quantized[" << b << "], got shape " << shape_string(keys_array));
  std::optional<py::array_t<float>> sinks;
  const ScoreRules rules = score_rules(scale_arg, softcap_arg, nullptr, sinks_obj, heads_q, sinks);
  py::array_t<float> out = owned_float_array({batch, fresh, heads_q, keys.dim});
  {
    py::gil_scoped_release release;
    quantized_attention(quantized.data(), queries.data(), fresh, heads_q, keys, values, rules,
                        out.mutable_data());
  }
  // The codes are finite by construction: a non-finite result comes from the tail.
  const std::int64_t row = fresh * heads_q * keys.dim;
  for (std::int64_t b = 0; b < batch; ++b)
    if (!all_finite(out.data() + b * row, row))
      raise_non_finite({{"tail_keys", keys.row(b, 0, keys.tokens)},
                        {"tail_values", values.row(b, 0, values.tokens)}});
  return out;
}

}  // namespace

void bind_quantization(py::module_& m) {
  py::class_<QuantizedKV>(m, "QuantizedKV")
      .def(py::init([](const py::object& keys_obj, const py::object& values_obj,
                       const Arg<int>& bits_arg, const Arg<std::int64_t>& group_arg,
                       const Arg<std::int64_t>& residual_arg) {
             const int bits = bits_arg.as("bits");
             const std::int64_t group = group_arg.as("group"),
                                residual = residual_arg.as("residual");
             const py::array keys_arg = as_array(keys_obj, "keys"),
                             values_arg = as_array(values_obj, "values");
             const auto [keys, values] = kv_pair(keys_arg, values_arg);
             require_finite(keys, "keys");
             require_finite(values, "values");
             KVPACK_ARG_CHECK(bits == 2 || bits == 4 || bits == 8,
                              "bits: expected 2, 4 or 8, got " << bits);
             KVPACK_ARG_CHECK(residual >= 0, "residual: expected >= 0, got " << residual);
             QuantParams p;
             p.bits = bits;
             p.group = group;
             p.residual = residual;
             py::gil_scoped_release release;
             return std::make_unique<QuantizedKV>(keys, values, p);
           }),
           py::arg("keys"), py::arg("values"), py::arg("bits") = 2, py::arg("group") = 32,
           py::arg("residual") = 128)
      .def(
          "dequantize",
          [](const QuantizedKV& self, const py::object& keys_out,
             const py::object& values_out) -> py::tuple {
            if (keys_out.is_none() && values_out.is_none()) {
              const std::vector<py::ssize_t> shape{self.heads(), self.tokens(), self.dim()};
              py::array_t<float> keys = owned_float_array(shape), values = owned_float_array(shape);
              {
                py::gil_scoped_release release;
                self.dequantize(keys.mutable_data(), values.mutable_data());
              }
              return py::make_tuple(keys, values);
            }
            // Into the caller's arrays (any KV dtype), e.g. a preallocated cache.
            const py::array keys = as_array(keys_out, "out"), values = as_array(values_out, "out");
            require_native(keys, "out");
            require_native(values, "out");
            const auto [k, v] = kv_pair(keys, values);
            KVPACK_ARG_CHECK(keys.writeable() && values.writeable(),
                             "out: expected writable arrays");
            KVPACK_ARG_CHECK(
                k.heads == self.heads() && k.tokens == self.tokens() && k.dim == self.dim(),
                "out: expected shape [" << self.heads() << ", " << self.tokens() << ", "
                                        << self.dim() << "], got " << shape_string(keys));
            {
              py::gil_scoped_release release;
              self.dequantize(k.dtype, const_cast<void*>(k.data), const_cast<void*>(v.data));
            }
            return py::make_tuple(keys, values);
          },
          py::arg("keys_out") = py::none(), py::arg("values_out") = py::none())
      .def(
          "attend",
          [](const QuantizedKV& self, const py::object& q_obj,
             const Arg<std::optional<double>>& scale_arg, const Arg<bool>& return_lse_arg,
             const Arg<bool>& return_weights_arg, const py::object& tail_keys_obj,
             const py::object& tail_values_obj, const Arg<std::optional<double>>& softcap_arg,
             const py::object& sinks_obj) {
            const bool return_lse = return_lse_arg.as("return_lse"),
                       return_weights = return_weights_arg.as("return_weights");
            const py::array_t<float> q =
                finite_float32(as_array(q_obj, "q"), "q", 2, "[heads_q, head_dim]");
            check_query(q, self.heads(), self.dim());
            const std::int64_t heads_q = q.shape(0);
            std::optional<py::array_t<float>> sinks;
            const ScoreRules rules =
                score_rules(scale_arg, softcap_arg, nullptr, sinks_obj, heads_q, sinks);
            KVPACK_ARG_CHECK(tail_keys_obj.is_none() == tail_values_obj.is_none(),
                             "tail: expected (keys, values), got only one of them");
            // The tail (tokens decoded since the prefill) is read in place, a slice of a
            // growing buffer included.
            py::array tail_keys, tail_values;
            std::optional<KVView> tk, tv;
            if (!tail_keys_obj.is_none()) {
              tail_keys = as_array(tail_keys_obj, "tail keys");
              tail_values = as_array(tail_values_obj, "tail values");
              tk = strided_kv_view(tail_keys, "tail keys");
              tv = strided_kv_view(tail_values, "tail values");
              KVPACK_ARG_CHECK(
                  tk->heads == self.heads() && tk->dim == self.dim() && tv->heads == tk->heads &&
                      tv->tokens == tk->tokens && tv->dim == tk->dim,
                  "tail: expected keys and values of shape ["
                      << self.heads() << ", n, " << self.dim() << "], got "
                      << shape_string(tail_keys) << " and " << shape_string(tail_values));
            }
            const std::int64_t attended = self.tokens() + (tk ? tk->tokens : 0);
            py::array_t<float> out = owned_float_array({heads_q, self.dim()});
            py::array_t<float> lse = owned_float_array({heads_q});
            py::array_t<float> weights =
                return_weights ? owned_float_array({heads_q, attended}) : owned_float_array({0});
            {
              py::gil_scoped_release release;
              self.attend(q.data(), heads_q, rules,
                          AttentionOutput{out.mutable_data(), lse.mutable_data(),
                                          return_weights ? weights.mutable_data() : nullptr},
                          tk ? &*tk : nullptr, tv ? &*tv : nullptr);
            }
            // The codes are finite by construction: a non-finite result comes from the tail.
            if (tk && !all_finite(out.data(), out.size()))
              raise_non_finite({{"tail keys", *tk}, {"tail values", *tv}});
            return py::make_tuple(out, return_lse ? py::object(lse) : py::object(py::none()),
                                  return_weights ? py::object(weights) : py::object(py::none()));
          },
          py::arg("q"), py::arg("scale") = py::none(), py::arg("return_lse") = false,
          py::arg("return_weights") = false, py::arg("tail_keys") = py::none(),
          py::arg("tail_values") = py::none(), py::arg("softcap") = py::none(),
          py::arg("sinks") = py::none())
      .def_property_readonly("nbytes", &QuantizedKV::nbytes)
      .def_property_readonly("bits", [](const QuantizedKV& s) { return s.params().bits; })
      .def_property_readonly("group", [](const QuantizedKV& s) { return s.params().group; })
      .def_property_readonly("residual", [](const QuantizedKV& s) { return s.params().residual; })
      .def_property_readonly("quantized", &QuantizedKV::quantized)
      .def_property_readonly("heads", &QuantizedKV::heads)
      .def_property_readonly("tokens", &QuantizedKV::tokens)
      .def_property_readonly("head_dim", &QuantizedKV::dim)
      .def_property_readonly("dtype", [](const QuantizedKV& s) { return numpy_dtype(s.dtype()); });

  m.def("quantized_attention", &quantized_attention_binding, py::arg("quantized"),
        py::arg("queries"), py::arg("tail_keys"), py::arg("tail_values"),
        py::arg("scale") = py::none(), py::arg("softcap") = py::none(),
        py::arg("sinks") = py::none(),
        "Decode attention of a batch, one QuantizedKV per row, looped in C++: out[b, i] is "
        "quantized[b].attend(queries[b, i], scale, softcap, sinks, tail_keys[b, :, :seen], "
        "tail_values[b, :, :seen]) with seen = decoded - new + i + 1; scores capped by "
        "softcap, a sink logit per query head joining the softmax. queries: float32 [batch, "
        "new, heads_q, head_dim]; tail_keys, tail_values: [batch, heads_kv, decoded, head_dim] "
        "in any KV dtype, the tokens decoded since the quantization (each head's rows "
        "contiguous; a slice of a buffer with spare room is read in place). Returns float32 "
        "[batch, new, heads_q, head_dim].");
}

}  // namespace kvpack::bindings
