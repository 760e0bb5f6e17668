// Bindings of kvpack/kmeans.h, cluster_index.h, quest.h and recall_cache.h: validate,
// convert, release the GIL, call the core.
#include <pybind11/stl.h>

#include <algorithm>

#include "args.h"
#include "arrays.h"
#include "kvpack/cluster_index.h"
#include "kvpack/kmeans.h"
#include "kvpack/quest.h"
#include "kvpack/recall_cache.h"
#include "methods.h"
#include "stats.h"

namespace kvpack::bindings {

namespace {

// Points [n, d] or [heads, n, d] as a [heads, n, d] view; batched tells which.
KVView points_view(const py::array& x, bool* batched) {
  const DType dtype = kv_dtype(x, "x");
  KVPACK_ARG_CHECK(
      x.ndim() == 2 || x.ndim() == 3,
      "x: expected 2 dimensions [n, d] or 3 [heads, n, d], got shape " << shape_string(x));
  KVPACK_ARG_CHECK(x.flags() & py::array::c_style,
                   "x: expected a C-contiguous array, got strides that are not; pass "
                   "numpy.ascontiguousarray(x)");
  *batched = x.ndim() == 3;
  KVView view;
  view.dtype = dtype;
  view.heads = *batched ? x.shape(0) : 1;
  view.tokens = x.shape(x.ndim() - 2);
  view.dim = x.shape(x.ndim() - 1);
  view.data = x.data();
  KVPACK_ARG_CHECK(view.heads > 0 && view.tokens > 0 && view.dim > 0,
                   "x: expected non-empty points, got shape " << shape_string(x));
  return view;
}

py::dict kmeans_binding(const py::object& x_obj, const Arg<std::int64_t>& n_clusters_arg,
                        const Arg<int>& iters_arg, const Arg<std::uint64_t>& seed_arg,
                        const Arg<bool>& spherical_arg, const py::object& init,
                        const py::object& init_centroids_obj, const Arg<std::string>& device) {
  const std::int64_t n_clusters = n_clusters_arg.as("n_clusters");
  const int iters = iters_arg.as("iters");
  const std::uint64_t seed = seed_arg.as("seed");
  const bool spherical = spherical_arg.as("spherical");
  Execution exec = parse_device(device.as("device"));
  bool batched = false;
  KVView points;
  py::array x;
  DLPackTensor keep;
  const Device on = device_of(x_obj, "x");
  if (on.is_cuda()) {  // points in CUDA memory stay there; results come back to the host
    const CudaCall call(on, "x");
    exec = call.exec;
    batched = x_obj.attr("dim")().cast<int>() == 3;
    points = call.kv_view(batched ? x_obj : x_obj.attr("unsqueeze")(0), "x", keep);
  } else {
    x = as_array(x_obj, "x");
    points = points_view(x, &batched);
    require_finite(points, "x");
  }
  KVPACK_ARG_CHECK(
      n_clusters >= 1 && n_clusters <= points.tokens,
      "n_clusters: expected 1 <= n_clusters <= points=" << points.tokens << ", got " << n_clusters);
  KVPACK_ARG_CHECK(iters >= 1, "iters: expected >= 1, got " << iters);
  KMeansParams params;
  params.n_clusters = n_clusters;
  params.iterations = iters;
  params.seed = seed;
  params.spherical = spherical;
  params.init = parse_init(init, "init");
  std::optional<py::array_t<float>> init_centroids;
  if (!init_centroids_obj.is_none()) {
    init_centroids =
        finite_float32(as_array(init_centroids_obj, "init_centroids"), "init_centroids",
                       batched ? 3 : 2, batched ? "[heads, n_clusters, d]" : "[n_clusters, d]");
    const bool ok =
        batched
            ? init_centroids->shape(0) == points.heads && init_centroids->shape(1) == n_clusters &&
                  init_centroids->shape(2) == points.dim
            : init_centroids->shape(0) == n_clusters && init_centroids->shape(1) == points.dim;
    KVPACK_ARG_CHECK(ok, "init_centroids: expected shape "
                             << (batched ? "(" + std::to_string(points.heads) + ", " : "(")
                             << n_clusters << ", " << points.dim << "), got "
                             << shape_string(*init_centroids));
  }
  std::vector<KMeansResult> results;
  {
    py::gil_scoped_release release;
    const float* init_ptr = init_centroids ? init_centroids->data() : nullptr;
    results = kmeans_heads(points, params, init_ptr, exec);
  }
  // Gather the per-head results into [heads, ...] arrays.
  const std::int64_t heads = points.heads, k = n_clusters, d = points.dim, n = points.tokens;
  std::vector<float> centroids;
  std::vector<std::int32_t> labels;
  std::vector<double> objective;
  std::vector<std::int32_t> iterations;
  py::list history;
  for (KMeansResult& r : results) {
    centroids.insert(centroids.end(), r.centroids.begin(), r.centroids.end());
    labels.insert(labels.end(), r.labels.begin(), r.labels.end());
    objective.push_back(r.objective);
    iterations.push_back(r.iterations);
    history.append(py::cast(r.history));
  }
  py::dict out;
  if (batched) {
    out["centroids"] = adopt_vector(std::move(centroids), {heads, k, d});
    out["labels"] = adopt_vector(std::move(labels), {heads, n});
    out["objective"] = adopt_vector(std::move(objective), {heads});
    out["iterations"] = adopt_vector(std::move(iterations), {heads});
    out["history"] = history;
  } else {
    out["centroids"] = adopt_vector(std::move(centroids), {k, d});
    out["labels"] = adopt_vector(std::move(labels), {n});
    out["objective"] = py::float_(objective[0]);
    out["iterations"] = py::int_(iterations[0]);
    out["history"] = history[0];
  }
  return out;
}

// A zero-copy array over part of a shared index snapshot; the capsule keeps it alive.
template <class T>
py::array_t<T> snapshot_array(const std::shared_ptr<const ClusterArrays>& arrays,
                              const std::vector<T>& data, const std::vector<py::ssize_t>& shape) {
  auto* keep = new std::shared_ptr<const ClusterArrays>(arrays);
  py::capsule owner(keep,
                    [](void* p) { delete static_cast<std::shared_ptr<const ClusterArrays>*>(p); });
  py::array_t<T> out(shape, data.data(), owner);
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

py::array_t<std::int32_t> selection_array(std::vector<std::int32_t>&& tokens, std::int64_t rows) {
  const auto count =
      static_cast<py::ssize_t>(rows ? static_cast<std::int64_t>(tokens.size()) / rows : 0);
  return adopt_vector(std::move(tokens), {static_cast<py::ssize_t>(rows), count});
}

// A recall step's selection as [rows, widest row]: rows of different sizes (adaptive head
// budgets) padded with -1 after their tokens.
py::array_t<std::int32_t> last_selection_array(const RecallCache& cache) {
  const std::vector<std::int32_t>& tokens = cache.last_selection();
  const std::vector<std::int64_t>& at = cache.last_offsets();
  const std::int64_t rows = cache.last_rows();
  std::int64_t widest = 0;
  for (std::int64_t r = 0; r < rows; ++r) widest = std::max(widest, at[r + 1] - at[r]);
  std::vector<std::int32_t> padded(static_cast<std::size_t>(rows * widest), -1);
  for (std::int64_t r = 0; r < rows; ++r)
    std::copy(tokens.begin() + at[r], tokens.begin() + at[r + 1], padded.begin() + r * widest);
  return selection_array(std::move(padded), rows);
}

// Validates and appends decoded tokens' keys to a ClusterIndex or QuestIndex.
template <class Index>
void append_keys(Index& index, const py::object& keys_obj) {
  const py::array keys = contiguous_token(keys_obj, "new_keys");
  const KVView view = token_view(keys, "new_keys");
  require_finite(view, "new_keys");
  py::gil_scoped_release release;
  index.append(view);
}

// Validates q and budget, then runs select(q, out) into a [rows, n] token array.
template <class Index, class Select>
py::array_t<std::int32_t> select_tokens(const Index& index, const py::object& q_obj,
                                        std::int64_t budget, bool per_query_head, Select select) {
  const py::array_t<float> q = finite_float32(as_array(q_obj, "q"), "q", 2, "[heads_q, head_dim]");
  check_query(q, index.heads(), index.dim());
  KVPACK_ARG_CHECK(budget >= 1, "budget: expected >= 1, got " << budget);
  const std::int64_t rows = per_query_head ? q.shape(0) : index.heads();
  std::vector<std::int32_t> out(static_cast<std::size_t>(rows * index.selection_size(budget)));
  {
    py::gil_scoped_release release;
    select(q, out.data());
  }
  return selection_array(std::move(out), rows);
}

py::dict recall_stats_dict(const RecallStats& s) {
  py::dict d =
      stats_dict(s, field("steps", &RecallStats::steps), field("selected", &RecallStats::selected),
                 field("hits", &RecallStats::hits), field("loaded", &RecallStats::loaded),
                 field("bytes_loaded", &RecallStats::bytes_loaded),
                 field("candidates", &RecallStats::candidates));
  d["hit_rate"] = s.selected ? static_cast<double>(s.hits) / static_cast<double>(s.selected) : 0.0;
  return d;
}

py::array_t<float> recall_step_binding(const py::object& caches_obj, const py::object& queries_obj,
                                       const py::object& keys_obj, const py::object& values_obj,
                                       const Arg<std::optional<double>>& scale_arg,
                                       const Arg<std::optional<double>>& softcap_arg,
                                       const py::object& sinks_obj) {
  const BatchStep step = batch_step(queries_obj, keys_obj, values_obj, "keys", "values", false);
  const py::array_t<float>& queries = step.queries;
  const py::array& keys_array = step.keys_array;
  const BatchKVView &keys = step.keys, &values = step.values;
  const std::int64_t batch = step.batch, fresh = step.fresh, heads_q = step.heads_q;
  KVPACK_ARG_CHECK(keys.tokens == fresh, "keys: expected shape ("
                                             << batch << ", heads_kv, " << fresh << ", " << keys.dim
                                             << "): one token per new query, got "
                                             << shape_string(keys_array));
  std::vector<py::object> keep;
  const std::vector<RecallCache*> caches =
      batch_objects<RecallCache>(caches_obj, "caches", "RecallCache", batch, "queries", keep);
  for (std::size_t b = 0; b < caches.size(); ++b) {
    const RecallCache& cache = *caches[b];
    KVPACK_ARG_CHECK(cache.tokens() > 0, "caches[" << b << "]: call prefill(keys, values) first");
    KVPACK_ARG_CHECK(cache.heads() == keys.heads && cache.dim() == keys.dim,
                     "keys: expected heads_kv " << cache.heads() << " and head_dim " << cache.dim()
                                                << " like the prefill of caches[" << b
                                                << "], got shape " << shape_string(keys_array));
    KVPACK_TYPE_CHECK(cache.dtype() == keys.dtype, "keys/values: expected dtype "
                                                       << dtype_name(cache.dtype())
                                                       << " like the prefill of caches[" << b
                                                       << "], got " << dtype_string(keys_array));
  }
  // A NaN key would poison the clustering later: every new token is checked first.
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < fresh; ++i) {
      const std::string at = "[" + std::to_string(b) + ", :, " + std::to_string(i) + "]";
      require_finite(keys.row(b, i, 1), ("keys" + at).c_str());
      require_finite(values.row(b, i, 1), ("values" + at).c_str());
    }
  std::optional<py::array_t<float>> sinks;
  const ScoreRules rules = score_rules(scale_arg, softcap_arg, nullptr, sinks_obj, heads_q, sinks);
  py::array_t<float> out = owned_float_array({batch, fresh, heads_q, keys.dim});
  {
    py::gil_scoped_release release;
    recall_step(caches.data(), queries.data(), heads_q, keys, values, out.mutable_data(), rules);
  }
  const std::int64_t row = fresh * heads_q * keys.dim;
  for (std::int64_t b = 0; b < batch; ++b)
    if (!all_finite(out.data() + b * row, row))
      raise_non_finite({{"keys", caches[b]->keys()}, {"values", caches[b]->values()}});
  return out;
}

}  // namespace

void bind_clustering(py::module_& m) {
  const ClusterIndexParams index_defaults;
  py::class_<ClusterIndex>(m, "ClusterIndex")
      .def(py::init([](const py::object& keys_obj, const Arg<std::int64_t>& n_clusters,
                       const Arg<std::int64_t>& sink, const Arg<int>& iters,
                       const Arg<std::uint64_t>& seed, const py::object& init,
                       const Arg<std::int64_t>& append_interval,
                       const Arg<std::int64_t>& append_clusters,
                       const Arg<std::int64_t>& tokens_per_cluster) {
             const py::array keys = as_array(keys_obj, "keys");
             const KVView view = kv_view(keys, "keys");
             require_finite(view, "keys");
             ClusterIndexParams p;
             p.n_clusters = n_clusters.as("n_clusters");
             p.sink = sink.as("sink");
             p.iterations = iters.as("iters");
             p.seed = seed.as("seed");
             p.init = parse_init(init, "init");
             p.append_interval = append_interval.as("append_interval");
             p.append_clusters = append_clusters.as("append_clusters");
             p.tokens_per_cluster = tokens_per_cluster.as("tokens_per_cluster");
             py::gil_scoped_release release;
             return std::make_unique<ClusterIndex>(view, p);
           }),
           py::arg("keys"), py::arg("n_clusters") = index_defaults.n_clusters,
           py::arg("sink") = index_defaults.sink, py::arg("iters") = index_defaults.iterations,
           py::arg("seed") = index_defaults.seed, py::arg("init") = init_name(index_defaults.init),
           py::arg("append_interval") = index_defaults.append_interval,
           py::arg("append_clusters") = index_defaults.append_clusters,
           py::arg("tokens_per_cluster") = index_defaults.tokens_per_cluster)
      .def("append", &append_keys<ClusterIndex>, py::arg("new_keys"))
      .def(
          "select",
          [](const ClusterIndex& self, const py::object& q, const Arg<std::int64_t>& budget_arg,
             const Arg<std::int64_t>& window_arg, const Arg<bool>& per_query_head_arg) {
            const std::int64_t budget = budget_arg.as("budget"), window = window_arg.as("window");
            const bool per_query_head = per_query_head_arg.as("per_query_head");
            KVPACK_ARG_CHECK(window >= 0, "window: expected >= 0, got " << window);
            return select_tokens(self, q, budget, per_query_head,
                                 [&](const py::array_t<float>& qa, std::int32_t* out) {
                                   self.select(qa.data(), qa.shape(0), budget, window,
                                               per_query_head, out);
                                 });
          },
          py::arg("q"), py::arg("budget"), py::arg("window") = 0, py::arg("per_query_head") = false)
      .def_property_readonly("heads", &ClusterIndex::heads)
      .def_property_readonly("head_dim", &ClusterIndex::dim)
      .def_property_readonly("tokens", &ClusterIndex::tokens)
      .def_property_readonly("sink", &ClusterIndex::sink)
      .def_property_readonly("n_clusters",
                             [](const ClusterIndex& s) { return s.arrays()->clusters; })
      .def_property_readonly("clustered_until",
                             [](const ClusterIndex& s) { return s.arrays()->end; })
      .def_property_readonly(
          "centroids",
          [](const ClusterIndex& s) {
            auto a = s.arrays();
            return snapshot_array(a, a->centroids, {s.heads(), a->clusters, s.dim()});
          })
      .def_property_readonly("sizes",
                             [](const ClusterIndex& s) {
                               auto a = s.arrays();
                               return snapshot_array(a, a->sizes, {s.heads(), a->clusters});
                             })
      .def_property_readonly("offsets",
                             [](const ClusterIndex& s) {
                               auto a = s.arrays();
                               return snapshot_array(a, a->offsets, {s.heads(), a->clusters + 1});
                             })
      .def_property_readonly("order",
                             [](const ClusterIndex& s) {
                               auto a = s.arrays();
                               return snapshot_array(a, a->order, {s.heads(), a->clustered});
                             })
      .def_property_readonly("labels", [](const ClusterIndex& s) {
        auto a = s.arrays();
        return snapshot_array(a, a->labels, {s.heads(), a->end});
      });

  py::class_<QuestIndex>(m, "QuestIndex")
      .def(py::init([](const py::object& keys_obj, const Arg<std::int64_t>& page_size_arg) {
             const std::int64_t page_size = page_size_arg.as("page_size");
             const py::array keys = as_array(keys_obj, "keys");
             const KVView view = kv_view(keys, "keys");
             require_finite(view, "keys");
             KVPACK_ARG_CHECK(page_size >= 1, "page_size: expected >= 1, got " << page_size);
             py::gil_scoped_release release;
             return std::make_unique<QuestIndex>(view, page_size);
           }),
           py::arg("keys"), py::arg("page_size") = QuestParams{}.page_size)
      .def("append", &append_keys<QuestIndex>, py::arg("new_keys"))
      .def(
          "select",
          [](const QuestIndex& self, const py::object& q, const Arg<std::int64_t>& budget_arg,
             const Arg<bool>& per_query_head_arg) {
            const std::int64_t budget = budget_arg.as("budget");
            const bool per_query_head = per_query_head_arg.as("per_query_head");
            return select_tokens(self, q, budget, per_query_head,
                                 [&](const py::array_t<float>& qa, std::int32_t* out) {
                                   self.select(qa.data(), qa.shape(0), budget, per_query_head, out);
                                 });
          },
          py::arg("q"), py::arg("budget"), py::arg("per_query_head") = false)
      .def_property_readonly("heads", &QuestIndex::heads)
      .def_property_readonly("head_dim", &QuestIndex::dim)
      .def_property_readonly("tokens", &QuestIndex::tokens)
      .def_property_readonly("page_size", &QuestIndex::page_size)
      .def_property_readonly("pages", &QuestIndex::pages)
      .def_property_readonly("page_bounds", [](const QuestIndex& s) {
        // Copies: the index grows in place.
        std::vector<float> lo, hi;
        for (std::int64_t h = 0; h < s.heads(); ++h) {
          const auto begin = static_cast<std::ptrdiff_t>(h * s.capacity() * s.dim());
          const auto end = begin + static_cast<std::ptrdiff_t>(s.pages() * s.dim());
          lo.insert(lo.end(), s.page_min().begin() + begin, s.page_min().begin() + end);
          hi.insert(hi.end(), s.page_max().begin() + begin, s.page_max().begin() + end);
        }
        const std::vector<py::ssize_t> shape{s.heads(), s.pages(), s.dim()};
        return py::make_tuple(adopt_vector(std::move(lo), shape),
                              adopt_vector(std::move(hi), shape));
      });

  py::class_<RecallCache>(m, "RecallCache")
      .def(py::init([](const Arg<std::int64_t>& budget_arg, const py::object& method) {
             const std::int64_t budget = budget_arg.as("budget");
             RecallMethod recall = recall_method(method);
             std::visit([budget](RecallParams& p) { p.budget = budget; }, recall);
             return std::make_unique<RecallCache>(recall);
           }),
           py::arg("budget"), py::arg("method"))
      .def(
          "prefill",
          [](RecallCache& self, const py::object& keys_obj, const py::object& values_obj) {
            const py::array keys = as_array(keys_obj, "keys"),
                            values = as_array(values_obj, "values");
            const auto [k, v] = kv_pair(keys, values);
            require_finite(k, "keys");
            require_finite(v, "values");
            py::gil_scoped_release release;
            self.prefill(k, v);
          },
          py::arg("keys"), py::arg("values"))
      .def(
          "step",
          [](RecallCache& self, const py::object& q, const py::object& key,
             const py::object& value) {
            // A NaN key would poison the clustering later; decode_step rejects it.
            return decode_step(self, self.tokens() > 0, q, key, value);
          },
          py::arg("q"), py::arg("new_key"), py::arg("new_value"))
      .def_property_readonly("tokens", &RecallCache::tokens)
      .def_property_readonly("nbytes",
                             [](const RecallCache& s) {
                               py::dict tiers;
                               tiers["slow"] = s.slow_tier_bytes();
                               tiers["fast"] = s.fast_tier_bytes();
                               tiers["codes"] = s.code_bytes();
                               return tiers;
                             })
      .def_property_readonly("n_clusters",
                             [](const RecallCache& s) -> std::int64_t {
                               return s.selector() ? s.selector()->stats().clusters : 0;
                             })
      .def_property_readonly("last_step",
                             [](const RecallCache& s) { return recall_stats_dict(s.last_step()); })
      .def_property_readonly("total",
                             [](const RecallCache& s) { return recall_stats_dict(s.total()); })
      .def_property_readonly("last_selection", &last_selection_array)
      .def_property_readonly("last_candidates", [](const RecallCache& s) {
        std::vector<std::int32_t> copy = s.last_candidates();
        return selection_array(std::move(copy), s.last_rows());
      });

  m.def("recall_step", &recall_step_binding, py::arg("caches"), py::arg("queries"), py::arg("keys"),
        py::arg("values"), py::arg("scale") = py::none(), py::arg("softcap") = py::none(),
        py::arg("sinks") = py::none(),
        "One decode step of a batch, one RecallCache per row, looped in C++: out[b, i] is "
        "caches[b].step(queries[b, i], keys[b, :, i], values[b, :, i]), rows in turn and each "
        "row's positions in order; scores scaled by scale (None: 1/sqrt(head_dim)), capped by "
        "softcap, a sink logit per query head joining the softmax. queries: float32 [batch, "
        "new, heads_q, head_dim]; keys, "
        "values: [batch, heads_kv, new, head_dim] in the caches' dtype (each head_dim row "
        "contiguous; strided views are read in place). Returns float32 [batch, new, heads_q, "
        "head_dim].");

  const KMeansParams kmeans_defaults;
  m.def("kmeans", &kmeans_binding, py::arg("x"), py::arg("n_clusters"),
        py::arg("iters") = kmeans_defaults.iterations, py::arg("seed") = kmeans_defaults.seed,
        py::arg("spherical") = kmeans_defaults.spherical,
        py::arg("init") = init_name(kmeans_defaults.init), py::arg("init_centroids") = py::none(),
        py::arg("device") = "cpu", "k-means; see kvpack.kmeans.");
}

}  // namespace kvpack::bindings
