// Bindings of kvpack/attention.h: validate, convert, release the GIL, call the core,
// which runs the backend of the data's device.
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>

#include "args.h"
#include "arrays.h"
#include "kvpack/attention.h"
#include "kvpack/backend.h"

namespace kvpack::bindings {

namespace {

// Decode attention over tensors in CUDA memory: results are new tensors on that device.
// Values are not checked for NaN/Inf there (that would wait for the device).
py::tuple cuda_attention(const Device& device, const py::object& q_obj, const py::object& keys_obj,
                         const py::object& values_obj, const py::object& indices_obj,
                         const py::object& bias_obj, const std::optional<double>& scale,
                         bool return_lse, bool return_weights) {
  const CudaCall call(device, "keys");
  DLPackTensor keep_k, keep_v, keep_q, keep_idx, keep_bias;
  const KVView keys = call.kv_view(keys_obj, "keys", keep_k);
  const KVView values = call.kv_view(values_obj, "values", keep_v);
  KVPACK_ARG_CHECK(
      values.heads == keys.heads && values.tokens == keys.tokens && values.dim == keys.dim,
      "values: expected the shape of keys");
  KVPACK_TYPE_CHECK(values.dtype == keys.dtype, "values: expected dtype "
                                                    << dtype_name(keys.dtype) << " like keys, got "
                                                    << dtype_name(values.dtype));
  std::vector<std::int64_t> q_shape, bias_shape;
  const float* q = call.float32(q_obj, "q", 2, q_shape, keep_q);
  const std::int64_t heads_q = q_shape[0];
  KVPACK_ARG_CHECK(q_shape[1] == keys.dim, "q: expected head_dim " << keys.dim << " like keys");
  KVPACK_ARG_CHECK(heads_q % keys.heads == 0,
                   "q: expected heads_q to be a multiple of heads_kv=" << keys.heads);
  IndexView indices;
  if (!indices_obj.is_none()) {
    // Bounds and order are checked on a host copy: a bad index would read out of bounds.
    const py::array host = as_array(indices_obj.attr("cpu")(), "indices");
    const IndexView checked = index_view(host, "indices", keys.tokens);
    KVPACK_ARG_CHECK(checked.rows == keys.heads || checked.rows == heads_q,
                     "indices: expected " << keys.heads << " (heads_kv) or " << heads_q
                                          << " (heads_q) rows, got shape " << shape_string(host));
    keep_idx = call.take(indices_obj, "indices");
    indices = IndexView{static_cast<const std::int32_t*>(keep_idx.tensor.data), checked.rows,
                        checked.count, device};
  }
  const float* bias = nullptr;
  if (!bias_obj.is_none()) {
    bias = call.float32(bias_obj, "bias", 2, bias_shape, keep_bias);
    KVPACK_ARG_CHECK(bias_shape[0] == keys.heads && bias_shape[1] == keys.tokens,
                     "bias: expected shape (" << keys.heads << ", " << keys.tokens << ")");
  }
  AttentionParams params;
  params.scale = resolve_scale_arg(scale);
  const std::int64_t count = indices_obj.is_none() ? keys.tokens : indices.count;
  const py::object out = call.empty({heads_q, keys.dim});
  const py::object lse = return_lse ? call.empty({heads_q}) : py::object(py::none());
  const py::object weights = return_weights ? call.empty({heads_q, count}) : py::object(py::none());
  const std::size_t scratch_bytes =
      decode_attention_scratch_bytes(device, heads_q, count, keys.dim);
  const py::object scratch = call.empty({static_cast<std::int64_t>((scratch_bytes + 3) / 4)});
  Execution exec = call.exec;
  exec.scratch = CudaCall::data(scratch);
  exec.scratch_bytes = scratch_bytes;
  const AttentionOutput output{CudaCall::data(out), return_lse ? CudaCall::data(lse) : nullptr,
                               return_weights ? CudaCall::data(weights) : nullptr};
  {
    py::gil_scoped_release release;
    decode_attention(q, heads_q, keys, values, indices_obj.is_none() ? nullptr : &indices, bias,
                     params, output, exec);
  }
  return py::make_tuple(out, lse, weights);
}

py::tuple attention(const py::object& q_obj, const py::object& keys_obj,
                    const py::object& values_obj, const py::object& indices_obj,
                    const py::object& bias_obj, const Arg<std::optional<double>>& scale_arg,
                    const Arg<bool>& return_lse_arg, const Arg<bool>& return_weights_arg,
                    const Arg<std::string>& device_arg) {
  const auto scale = scale_arg.as("scale");
  const bool return_lse = return_lse_arg.as("return_lse"),
             return_weights = return_weights_arg.as("return_weights");
  const std::string device = device_arg.as("device");
  const Device on = device_of(keys_obj, "keys");
  if (on.is_cuda())
    return cuda_attention(on, q_obj, keys_obj, values_obj, indices_obj, bias_obj, scale, return_lse,
                          return_weights);
  const py::array keys_arg = as_array(keys_obj, "keys"),
                  values_arg = as_array(values_obj, "values");
  const py::array q_arg = as_array(q_obj, "q");
  std::optional<py::array> indices_arg, bias_arg;
  if (!indices_obj.is_none()) indices_arg = as_array(indices_obj, "indices");
  if (!bias_obj.is_none()) bias_arg = as_array(bias_obj, "bias");
  const auto [keys, values] = kv_pair(keys_arg, values_arg);
  const py::array_t<float> q = finite_float32(q_arg, "q", 2, "[heads_q, head_dim]");
  const std::int64_t heads_q = q.shape(0);
  KVPACK_ARG_CHECK(q.shape(1) == keys.dim, "q: expected head_dim " << keys.dim
                                                                   << " like keys, got shape "
                                                                   << shape_string(q));
  KVPACK_ARG_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
                   "q: expected heads_q to be a positive multiple of heads_kv="
                       << keys.heads << ", got shape " << shape_string(q));
  IndexView indices;
  if (indices_arg) {
    indices = index_view(*indices_arg, "indices", keys.tokens);
    KVPACK_ARG_CHECK(indices.rows == keys.heads || indices.rows == heads_q,
                     "indices: expected " << keys.heads << " (heads_kv) or " << heads_q
                                          << " (heads_q) rows, got shape "
                                          << shape_string(*indices_arg));
  }
  std::optional<py::array_t<float>> bias;
  if (bias_arg) {
    bias = finite_float32(*bias_arg, "bias", 2, "[heads_kv, tokens]");
    KVPACK_ARG_CHECK(bias->shape(0) == keys.heads && bias->shape(1) == keys.tokens,
                     "bias: expected shape (" << keys.heads << ", " << keys.tokens << "), got "
                                              << shape_string(*bias));
  }
  AttentionParams params;
  params.scale = resolve_scale_arg(scale);
  const Execution exec = parse_device(device);

  const std::int64_t count = indices_arg ? indices.count : keys.tokens;
  py::array_t<float> out = owned_float_array({heads_q, keys.dim});
  py::array_t<float> lse = owned_float_array({heads_q});
  py::array_t<float> weights =
      return_weights ? owned_float_array({heads_q, count}) : owned_float_array({0});
  AttentionOutput output{out.mutable_data(), lse.mutable_data(),
                         return_weights ? weights.mutable_data() : nullptr};
  {
    py::gil_scoped_release release;
    const IndexView* index_ptr = indices_arg ? &indices : nullptr;
    const float* bias_ptr = bias ? bias->data() : nullptr;
    decode_attention(q.data(), heads_q, keys, values, index_ptr, bias_ptr, params, output, exec);
  }
  // Non-finite results can only come from non-finite (or overflowing) keys/values.
  if (!all_finite(lse.data(), heads_q) || !all_finite(out.data(), heads_q * keys.dim))
    raise_non_finite({{"keys", keys}, {"values", values}});
  return py::make_tuple(out, return_lse ? py::object(lse) : py::object(py::none()),
                        return_weights ? py::object(weights) : py::object(py::none()));
}

py::array_t<float> accumulated_attention_binding(
    const py::object& queries_obj, const py::object& keys_obj, const Arg<bool>& causal_arg,
    const Arg<std::string>& reduction_arg, const Arg<bool>& per_query_head_arg,
    const Arg<std::optional<double>>& scale_arg, const Arg<std::string>& device_arg) {
  const bool causal = causal_arg.as("causal"),
             per_query_head = per_query_head_arg.as("per_query_head");
  const std::string reduction = reduction_arg.as("reduction"), device = device_arg.as("device");
  const auto scale = scale_arg.as("scale");
  const py::array keys_arg = as_array(keys_obj, "keys"),
                  queries_arg = as_array(queries_obj, "queries");
  const KVView keys = kv_view(keys_arg, "keys");
  const py::array_t<float> queries =
      finite_float32(queries_arg, "queries", 3, "[heads_q, window, head_dim]");
  const std::int64_t heads_q = queries.shape(0), window = queries.shape(1);
  KVPACK_ARG_CHECK(queries.shape(2) == keys.dim, "queries: expected head_dim "
                                                     << keys.dim << " like keys, got shape "
                                                     << shape_string(queries));
  KVPACK_ARG_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
                   "queries: expected heads_q to be a positive multiple of heads_kv="
                       << keys.heads << ", got shape " << shape_string(queries));
  KVPACK_ARG_CHECK(window > 0, "queries: expected at least one query per head, got shape "
                                   << shape_string(queries));
  KVPACK_ARG_CHECK(!causal || window <= keys.tokens,
                   "queries: a causal window of "
                       << window << " queries needs at least as many keys, got " << keys.tokens
                       << " tokens");
  KVPACK_ARG_CHECK(reduction == "sum" || reduction == "mean",
                   "reduction: expected 'sum' or 'mean', got '" << reduction << "'");
  AccumulateParams params;
  params.scale = resolve_scale_arg(scale);
  params.causal = causal;
  params.reduction = reduction == "mean" ? Reduction::Mean : Reduction::Sum;
  params.per_query_head = per_query_head;
  const Execution exec = parse_device(device);
  py::array_t<float> out = owned_float_array({per_query_head ? heads_q : keys.heads, keys.tokens});
  {
    py::gil_scoped_release release;
    accumulated_attention(queries.data(), heads_q, window, keys, params, out.mutable_data(), exec);
  }
  if (!all_finite(out.data(), out.size())) raise_non_finite({{"keys", keys}});
  return out;
}

// One layer's decode step for a batch (kvpack::held_attention): the Hugging Face cache's
// single core call per layer and step.
py::array_t<float> held_attention_binding(
    const py::object& queries_obj, const py::object& keys_obj, const py::object& values_obj,
    const py::object& positions_obj, const Arg<std::int64_t>& first_decoded_arg,
    const Arg<std::int64_t>& first_query_arg, const py::object& bias_obj,
    const Arg<std::optional<double>>& scale_arg, const Arg<std::optional<double>>& softcap_arg,
    const Arg<std::optional<std::int64_t>>& window_arg, const py::object& sinks_obj) {
  const std::int64_t first_decoded = first_decoded_arg.as("first_decoded"),
                     first_query = first_query_arg.as("first_query");
  const BatchStep step = batch_step(queries_obj, keys_obj, values_obj, "keys", "values", true);
  const py::array positions_arg = as_array(positions_obj, "positions");
  const py::array& keys_arg = step.keys_array;
  const BatchKVView &keys = step.keys, &values = step.values;
  const std::int64_t batch = step.batch, new_queries = step.fresh, heads_q = step.heads_q;
  const std::int64_t heads_kv = keys.heads;
  KVPACK_TYPE_CHECK(positions_arg.dtype().kind() == 'i' && positions_arg.itemsize() == 8,
                    "positions: expected dtype int64, got " << dtype_string(positions_arg));
  require_native(positions_arg, "positions");
  require_layout(positions_arg, "positions", 3, "[batch, heads_kv, held]");
  const std::int64_t held = positions_arg.shape(2);
  KVPACK_ARG_CHECK(positions_arg.shape(0) == batch && positions_arg.shape(1) == heads_kv &&
                       held <= keys_arg.shape(2),
                   "positions: expected shape (" << batch << ", " << heads_kv
                                                 << ", held <= " << keys_arg.shape(2) << "), got "
                                                 << shape_string(positions_arg));
  const auto* positions = static_cast<const std::int64_t*>(positions_arg.data());
  KVPACK_ARG_CHECK(
      std::all_of(positions, positions + positions_arg.size(),
                  [&](std::int64_t p) { return p >= -1 && p < first_decoded; }),
      "positions: expected each held position in [-1, first_decoded=" << first_decoded << ")");
  KVPACK_ARG_CHECK(first_query >= first_decoded, "first_query: expected at least first_decoded="
                                                     << first_decoded << ", got " << first_query);
  std::optional<py::array_t<float>> bias;
  if (!bias_obj.is_none()) {
    bias = finite_float32(as_array(bias_obj, "bias"), "bias", 3, "[batch, heads_kv, held]");
    KVPACK_ARG_CHECK(
        bias->shape(0) == batch && bias->shape(1) == heads_kv && bias->shape(2) == held,
        "bias: expected shape (" << batch << ", " << heads_kv << ", " << held
                                 << ") like positions, got " << shape_string(*bias));
  }
  const HeldSlots slots{positions, held, first_decoded, bias ? bias->data() : nullptr};
  std::optional<py::array_t<float>> sinks;
  const ScoreRules rules =
      score_rules(scale_arg, softcap_arg, &window_arg, sinks_obj, heads_q, sinks);
  py::array_t<float> out = owned_float_array({batch, new_queries, heads_q, keys_arg.shape(3)});
  {
    py::gil_scoped_release release;
    held_attention(step.queries.data(), new_queries, heads_q, first_query, keys, values, slots,
                   rules, out.mutable_data());
  }
  if (!all_finite(out.data(), out.size()))
    raise_non_finite(
        {{"keys", keys.row(0, 0, keys.tokens)}, {"values", values.row(0, 0, values.tokens)}});
  return out;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("indices") = py::none(), py::arg("bias") = py::none(),
        py::arg("scale") = py::none(), py::arg("return_lse") = false,
        py::arg("return_weights") = false, py::arg("device") = "cpu",
        "Decode attention; returns (out, lse or None, weights or None). See kvpack.attention.");
  m.def("held_attention", &held_attention_binding, py::arg("queries"), py::arg("keys"),
        py::arg("values"), py::arg("positions"), py::arg("first_decoded"), py::arg("first_query"),
        py::arg("bias") = py::none(), py::arg("scale") = py::none(),
        py::arg("softcap") = py::none(), py::arg("window") = py::none(),
        py::arg("sinks") = py::none(),
        "One decode step of a batch over one layer's cache: held slots (at positions, -1 empty) "
        "then decoded tokens from first_decoded, scores capped by softcap, seen within window "
        "positions, with a sink logit per query head; returns [batch, new, heads_q, head_dim].");
  m.def("accumulated_attention", &accumulated_attention_binding, py::arg("queries"),
        py::arg("keys"), py::arg("causal") = true, py::arg("reduction") = "sum",
        py::arg("per_query_head") = false, py::arg("scale") = py::none(), py::arg("device") = "cpu",
        "Attention each key receives from a window of queries. See kvpack.accumulated_attention.");
}

}  // namespace kvpack::bindings
