// Bindings of kvpack/kmeans.h: validate, convert, release the GIL, call the core.
#include <pybind11/stl.h>

#include "arrays.h"
#include "kvpack/kmeans.h"

namespace kvpack::bindings {

namespace {

KMeansInit parse_init(const std::string& init) {
  KVPACK_ARG_CHECK(init == "kmeans++" || init == "random",
                   "init: expected 'kmeans++' or 'random', got '" << init << "'");
  return init == "random" ? KMeansInit::Random : KMeansInit::PlusPlus;
}

// Points [n, d] or [heads, n, d] as a [heads, n, d] view; batched tells which.
KVView points_view(const py::array& x, bool* batched) {
  kv_dtype(x, "x");
  KVPACK_ARG_CHECK(
      x.ndim() == 2 || x.ndim() == 3,
      "x: expected 2 dimensions [n, d] or 3 [heads, n, d], got shape " << shape_string(x));
  KVPACK_ARG_CHECK(x.flags() & py::array::c_style,
                   "x: expected a C-contiguous array, got strides that are not; pass "
                   "numpy.ascontiguousarray(x)");
  *batched = x.ndim() == 3;
  KVView view;
  view.dtype = kv_dtype(x, "x");
  view.heads = *batched ? x.shape(0) : 1;
  view.tokens = x.shape(x.ndim() - 2);
  view.dim = x.shape(x.ndim() - 1);
  view.data = x.data();
  KVPACK_ARG_CHECK(view.heads > 0 && view.tokens > 0 && view.dim > 0,
                   "x: expected non-empty points, got shape " << shape_string(x));
  return view;
}

py::dict kmeans_binding(const py::object& x_obj, std::int64_t n_clusters, int iters,
                        std::uint64_t seed, bool spherical, const std::string& init,
                        const py::object& init_centroids_obj) {
  const py::array x = as_array(x_obj, "x");
  bool batched = false;
  const KVView points = points_view(x, &batched);
  KVPACK_ARG_CHECK(
      n_clusters >= 1 && n_clusters <= points.tokens,
      "n_clusters: expected 1 <= n_clusters <= points=" << points.tokens << ", got " << n_clusters);
  KVPACK_ARG_CHECK(iters >= 1, "iters: expected >= 1, got " << iters);
  KMeansParams params;
  params.n_clusters = n_clusters;
  params.iterations = iters;
  params.seed = seed;
  params.spherical = spherical;
  params.init = parse_init(init);
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
    results = kmeans_heads(points, params, init_centroids ? init_centroids->data() : nullptr);
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

}  // namespace

void bind_clustering(py::module_& m) {
  m.def("kmeans", &kmeans_binding, py::arg("x"), py::arg("n_clusters"), py::arg("iters") = 20,
        py::arg("seed") = 0, py::arg("spherical") = true, py::arg("init") = "kmeans++",
        py::arg("init_centroids") = py::none(), "k-means; see kvpack.kmeans.");
}

}  // namespace kvpack::bindings
