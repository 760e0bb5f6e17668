// Bindings of kvpack/codec.h and store.h: validate, convert, release the GIL, call the core.
// Decoded caches come back as NumPy arrays over the core's memory (no copy).
#include <pybind11/stl.h>

#include <cmath>
#include <system_error>

#include "args.h"
#include "arrays.h"
#include "kvpack/checksum.h"
#include "kvpack/codec.h"
#include "kvpack/policy.h"
#include "kvpack/store.h"
#include "stats.h"

namespace kvpack::bindings {

namespace {

// Validated views of a context: a non-empty sequence of (keys, values) pairs, one dtype.
// The arrays are kept so the views stay valid.
struct __attribute__((visibility("hidden"))) Context {
  std::vector<py::array> arrays;
  std::vector<LayerView> layers;
  std::vector<py::array_t<float>> probe_arrays;
  std::vector<Evidence> probes;
};

Context context_arg(const py::object& kv, const py::object& probe_queries) {
  KVPACK_TYPE_CHECK(py::isinstance<py::sequence>(kv) && !py::isinstance<py::str>(kv),
                    "kv: expected a list of (keys, values) per layer, got "
                        << py::str(py::type::handle_of(kv).attr("__name__")).cast<std::string>());
  const auto layers = kv.cast<py::sequence>();
  KVPACK_ARG_CHECK(py::len(layers) > 0, "kv: expected at least one layer, got an empty list");
  Context context;
  for (std::size_t l = 0; l < py::len(layers); ++l) {
    const py::object pair = layers[l];
    KVPACK_TYPE_CHECK(py::isinstance<py::sequence>(pair) && py::len(pair) == 2,
                      "kv[" << l << "]: expected a (keys, values) pair");
    const py::array keys = as_array(pair[py::int_(0)], "keys");
    const py::array values = as_array(pair[py::int_(1)], "values");
    const auto [k, v] = kv_pair(keys, values);
    require_finite(k, "keys");
    require_finite(v, "values");
    KVPACK_ARG_CHECK(k.tokens >= 1, "kv[" << l << "]: expected at least one token, got 0");
    if (l > 0)
      KVPACK_ARG_CHECK(k.dtype == context.layers[0].keys.dtype,
                       "kv[" << l << "]: expected the dtype of layer 0 ("
                             << dtype_name(context.layers[0].keys.dtype) << "), got "
                             << dtype_name(k.dtype));
    context.arrays.push_back(keys);
    context.arrays.push_back(values);
    context.layers.push_back({k, v});
  }
  if (probe_queries.is_none()) return context;
  KVPACK_TYPE_CHECK(py::isinstance<py::sequence>(probe_queries),
                    "probe_queries: expected a list of [heads_q, n, head_dim] arrays per layer");
  const auto probes = probe_queries.cast<py::sequence>();
  KVPACK_ARG_CHECK(py::len(probes) == context.layers.size(),
                   "probe_queries: expected one array per layer (" << context.layers.size()
                                                                   << "), got " << py::len(probes));
  for (std::size_t l = 0; l < context.layers.size(); ++l) {
    py::array_t<float> q = finite_float32(as_array(probes[l], "probe_queries"), "probe_queries", 3,
                                          "[heads_q, n, head_dim]");
    const KVView& keys = context.layers[l].keys;
    KVPACK_ARG_CHECK(q.shape(0) >= keys.heads && q.shape(0) % keys.heads == 0 && q.shape(1) >= 1 &&
                         q.shape(2) == keys.dim,
                     "probe_queries[" << l << "]: expected [heads_q, n >= 1, " << keys.dim
                                      << "] with heads_q a multiple of " << keys.heads << ", got "
                                      << shape_string(q));
    Evidence probe;
    probe.queries = q.data();
    probe.heads_q = q.shape(0);
    probe.window = q.shape(1);
    context.probe_arrays.push_back(q);
    context.probes.push_back(probe);
  }
  return context;
}

Codec codec_arg(const std::string& name) {
  return parse_codec(name);
}

// A decoded context as a dict of lists of NumPy arrays that keep `storage` alive.
py::dict decoded_dict(DecodedKV&& decoded) {
  auto* owner = new std::shared_ptr<void>(std::move(decoded.storage));
  py::capsule capsule(owner, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
  const py::dtype dtype = numpy_dtype(decoded.dtype);
  py::list kv, positions, counts;
  for (const DecodedLayer& layer : decoded.layers) {
    const std::vector<py::ssize_t> shape{layer.heads, layer.tokens, layer.dim};
    kv.append(py::make_tuple(py::array(dtype, shape, layer.keys, capsule),
                             py::array(dtype, shape, layer.values, capsule)));
    if (layer.positions) {
      const std::vector<py::ssize_t> index_shape{layer.heads, layer.tokens};
      positions.append(py::array_t<std::int32_t>(index_shape, layer.positions, capsule));
      counts.append(py::array_t<std::int32_t>(index_shape, layer.counts, capsule));
    }
  }
  py::dict out;
  out["kv"] = kv;
  out["codec"] = decoded.codec.name();
  out["positions"] = positions.empty() ? py::object(py::none()) : py::object(positions);
  out["counts"] = counts.empty() ? py::object(py::none()) : py::object(counts);
  return out;
}

py::dict store_stats_dict(const StoreStats& stats) {
  py::dict tiers;
  for (const TierStats& tier : stats.tiers) {
    tiers[py::str(tier.name)] = stats_dict(
        tier, field("hits", &TierStats::hits), field("entries", &TierStats::entries),
        field("bytes", &TierStats::used), field("capacity", &TierStats::capacity),
        field("bandwidth", &TierStats::bandwidth), field("prefetched", &TierStats::prefetched));
  }
  py::dict out;
  out["tiers"] = tiers;
  add_stats(
      out, stats, field("gets", &StoreStats::gets), field("misses", &StoreStats::misses),
      field("puts", &StoreStats::puts), field("evictions", &StoreStats::evictions),
      field("moves", &StoreStats::moves), field("recompressions", &StoreStats::recompressions),
      field("corrupt", &StoreStats::corrupt),
      field("unauthenticated", &StoreStats::unauthenticated), field("stale", &StoreStats::stale),
      field("errors", &StoreStats::errors), field("mean_delay", &StoreStats::mean_delay),
      field("p95_delay", &StoreStats::p95_delay), field("mean_quality", &StoreStats::mean_quality));
  return out;
}

StorePolicy policy_arg(const std::string& policy) {
  if (policy == "adaptive") return StorePolicy::Adaptive;
  if (policy == "lru") return StorePolicy::LRU;
  if (policy == "kivi2-lru") return StorePolicy::Kivi2LRU;
  if (policy == "streaming-lru") return StorePolicy::StreamingLRU;
  KVPACK_ARG_CHECK(
      false,
      "policy: expected 'adaptive', 'lru', 'kivi2-lru' or 'streaming-lru', got '" << policy << "'");
  return StorePolicy::Adaptive;
}

}  // namespace

void bind_store(py::module_& m) {
  // A tier that cannot write (full or read-only disk) is an OSError with its errno.
  py::register_exception_translator([](std::exception_ptr failure) {
    try {
      if (failure) std::rethrow_exception(failure);
    } catch (const std::system_error& error) {
      const py::tuple args = py::make_tuple(error.code().value(), error.what());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });
  m.def(
      "xxh64",
      [](const Arg<py::bytes>& data, const Arg<std::uint64_t>& seed) {
        const py::bytes given = data.as("data");
        const std::string_view bytes = given;
        return xxh64(bytes.data(), bytes.size(), seed.as("seed"));
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of bytes (checksum of version 1 blobs).");
  m.def(
      "xxh3",
      [](const Arg<py::bytes>& data, const Arg<std::uint64_t>& seed) {
        const py::bytes given = data.as("data");
        const std::string_view bytes = given;
        return xxh3(bytes.data(), bytes.size(), seed.as("seed"));
      },
      py::arg("data"), py::arg("seed") = 0, "XXH3 (64-bit) of bytes (the blob checksum).");
  m.def(
      "place",
      [](const std::vector<std::vector<std::tuple<int, std::int64_t, double>>>& options,
         const std::vector<double>& priorities, const std::vector<std::int64_t>& capacities) {
        KVPACK_ARG_CHECK(priorities.size() == options.size(), "priorities: expected one per item ("
                                                                  << options.size() << "), got "
                                                                  << priorities.size());
        std::vector<PlacementItem> items(options.size());
        for (std::size_t i = 0; i < options.size(); ++i) {
          items[i].priority = priorities[i];
          for (const auto& [tier, bytes, utility] : options[i])
            items[i].options.push_back({tier, bytes, utility});
        }
        return place(items, capacities);
      },
      py::arg("options"), py::arg("priorities"), py::arg("capacities"),
      "The placement of items given as lists of (tier, bytes, utility) options: an option "
      "index per item, -1 for evicted.");
  m.def(
      "cluster_slot",
      [](const Arg<py::bytes>& key) {
        const py::bytes given = key.as("key");
        const std::string_view bytes = given;
        return cluster_slot(bytes);
      },
      py::arg("key"),
      "The Redis Cluster hash slot of a Redis key (CRC16 of its hash tag mod 16384), as "
      "CLUSTER KEYSLOT gives it.");
  m.def(
      "parse_codec", [](const Arg<std::string>& name) { return codec_arg(name.as("name")).name(); },
      py::arg("name"), "The canonical name of a codec; ValueError for an unknown one.");
  m.def(
      "encode_blob",
      [](const Arg<std::string>& key_arg, const py::object& kv, const Arg<std::string>& codec_name,
         const py::object& probe_queries) {
        const std::string key = key_arg.as("key");
        const Codec codec = codec_arg(codec_name.as("codec"));
        const Context context = context_arg(kv, probe_queries);
        BlobPtr blob;
        {
          py::gil_scoped_release release;
          blob = encode(key, context.layers, codec, context.probes);
        }
        return py::bytes(reinterpret_cast<const char*>(blob->data()), blob->size());
      },
      py::arg("key"), py::arg("kv"), py::arg("codec"), py::arg("probe_queries") = py::none());
  m.def(
      "decode_blob",
      [](const Arg<py::bytes>& data) {
        const py::bytes given = data.as("blob");
        const std::string_view bytes = given;
        auto blob = std::make_shared<Buffer>(bytes.size());
        std::memcpy(blob->data(), bytes.data(), bytes.size());
        KVPACK_ARG_CHECK(verify_blob(*blob),
                         "blob: not a kvpack blob, or corrupt (header or checksum mismatch)");
        DecodedKV decoded;
        try {
          py::gil_scoped_release release;
          decoded = decode(blob, false);
        } catch (const std::runtime_error& error) {
          // A checksummed but malformed blob is bad input too.
          throw std::invalid_argument(std::string("blob: ") + error.what());
        }
        py::dict out = decoded_dict(std::move(decoded));
        out["key"] = read_blob_info(blob->data(), blob->size()).key;
        return out;
      },
      py::arg("blob"));

  py::class_<TieredStore>(m, "TieredStore")
      .def(py::init([](const Arg<std::int64_t>& dram_bytes_arg,
                       const Arg<std::optional<std::string>>& ssd_dir_arg,
                       const Arg<std::int64_t>& ssd_bytes_arg,
                       const Arg<std::optional<std::string>>& redis_host_arg,
                       const Arg<int>& redis_port_arg, const Arg<int>& redis_db_arg,
                       const Arg<std::string>& redis_prefix_arg,
                       const Arg<std::int64_t>& redis_bytes_arg, const Arg<std::string>& policy_arg_,
                       const Arg<double>& alpha_arg,
                       const Arg<std::optional<std::vector<std::string>>>& codecs_arg,
                       const Arg<bool>& o_direct_arg, const Arg<int>& io_threads_arg,
                       const Arg<double>& streaming_rate_arg,
                       const Arg<std::optional<std::vector<double>>>& bandwidths_arg,
                       const Arg<std::optional<std::vector<double>>>& decode_bandwidths_arg,
                       const Arg<int>& timeout_ms_arg, const Arg<py::bytes>& secret_arg,
                       const std::optional<std::vector<std::pair<std::string, int>>>& redis_cluster) {
             const std::int64_t dram_bytes = dram_bytes_arg.as("dram_bytes"),
                                ssd_bytes = ssd_bytes_arg.as("ssd_bytes"),
                                redis_bytes = redis_bytes_arg.as("redis_bytes");
             const auto ssd_dir = ssd_dir_arg.as("ssd_dir");
             const auto redis_host = redis_host_arg.as("redis_host");
             const int redis_port = redis_port_arg.as("redis_port"),
                       redis_db = redis_db_arg.as("redis_db"),
                       io_threads = io_threads_arg.as("io_threads"),
                       timeout_ms = timeout_ms_arg.as("timeout_ms");
             const std::string redis_prefix = redis_prefix_arg.as("redis_prefix"),
                               policy = policy_arg_.as("policy"),
                               secret = std::string(secret_arg.as("secret"));
             const double alpha = alpha_arg.as("alpha"),
                          streaming_rate = streaming_rate_arg.as("streaming_rate");
             const auto codecs = codecs_arg.as("codecs");
             const bool o_direct = o_direct_arg.as("o_direct");
             const auto bandwidths = bandwidths_arg.as("bandwidths");
             const auto decode_bandwidths = decode_bandwidths_arg.as("decode_bandwidths");
             KVPACK_ARG_CHECK(dram_bytes >= 0, "dram_bytes: expected >= 0, got " << dram_bytes);
             KVPACK_ARG_CHECK(ssd_bytes >= 0, "ssd_bytes: expected >= 0, got " << ssd_bytes);
             KVPACK_ARG_CHECK(redis_bytes >= 0, "redis_bytes: expected >= 0, got " << redis_bytes);
             KVPACK_ARG_CHECK(ssd_bytes == 0 || ssd_dir,
                              "ssd_bytes: given without ssd_dir (where the SSD tier lives)");
             KVPACK_ARG_CHECK(std::isfinite(alpha) && alpha >= 0.0,
                              "alpha: expected a finite value >= 0, got " << alpha);
             KVPACK_ARG_CHECK(io_threads >= 1, "io_threads: expected >= 1, got " << io_threads);
             StoreParams params;
             params.dram_bytes = dram_bytes;
             params.ssd_dir = ssd_dir.value_or("");
             params.ssd_bytes = ssd_bytes;
             params.o_direct = o_direct;
             params.io_threads = io_threads;
             KVPACK_ARG_CHECK(!(redis_host && redis_cluster),
                              "redis_cluster: given with redis_host (one remote tier: a server or "
                              "a cluster)");
             if (redis_cluster) {
               KVPACK_ARG_CHECK(!redis_cluster->empty(),
                                "redis_cluster: expected at least one seed node, got none");
               for (const auto& [host, port] : *redis_cluster)
                 KVPACK_ARG_CHECK(!host.empty() && port > 0 && port < 65536,
                                  "redis_cluster: expected host:port with a port in [1, 65535], "
                                  "got '" << host << ":" << port << "'");
               KVPACK_ARG_CHECK(redis_db == 0, "redis_db: a Redis Cluster has database 0 only, got "
                                                   << redis_db);
               params.remote = true;
               params.redis.cluster = *redis_cluster;
               params.redis.prefix = redis_prefix;
               params.redis.capacity = redis_bytes;
               params.redis.timeout_ms = timeout_ms;
             }
             if (redis_host) {
               params.remote = true;
               params.redis.host = *redis_host;
               params.redis.port = redis_port;
               params.redis.db = redis_db;
               params.redis.prefix = redis_prefix;
               params.redis.capacity = redis_bytes;
               params.redis.timeout_ms = timeout_ms;
             }
             params.policy = policy_arg(policy);
             params.alpha = alpha;
             if (codecs) {
               KVPACK_ARG_CHECK(!codecs->empty(),
                                "codecs: expected at least 'none', got an empty list");
               for (const std::string& name : *codecs) params.codecs.push_back(codec_arg(name));
             }
             params.streaming_rate = static_cast<float>(streaming_rate);
             // An empty list would silently mean "measure": only None says that.
             KVPACK_ARG_CHECK(!bandwidths || !bandwidths->empty(),
                              "bandwidths: expected one per tier, got an empty list");
             KVPACK_ARG_CHECK(!decode_bandwidths || !decode_bandwidths->empty(),
                              "decode_bandwidths: expected one per codec or one for all, got an "
                              "empty list");
             if (bandwidths) params.bandwidths = *bandwidths;
             if (decode_bandwidths) params.decode_bandwidths = *decode_bandwidths;
             params.secret = secret;
             py::gil_scoped_release release;
             return std::make_unique<TieredStore>(params);
           }),
           py::arg("dram_bytes"), py::arg("ssd_dir") = py::none(), py::arg("ssd_bytes") = 0,
           py::arg("redis_host") = py::none(), py::arg("redis_port") = 6379,
           py::arg("redis_db") = 0, py::arg("redis_prefix") = "kvpack:", py::arg("redis_bytes") = 0,
           py::arg("policy") = "adaptive", py::arg("alpha") = 0.1, py::arg("codecs") = py::none(),
           py::arg("o_direct") = false, py::arg("io_threads") = 2, py::arg("streaming_rate") = 0.5,
           py::arg("bandwidths") = py::none(), py::arg("decode_bandwidths") = py::none(),
           py::arg("timeout_ms") = 2000, py::arg("secret") = py::bytes(),
           py::arg("redis_cluster") = py::none())
      .def(
          "put",
          [](TieredStore& self, const Arg<std::string>& key_arg, const py::object& kv,
             const py::object& probe_queries,
             const Arg<std::optional<std::vector<double>>>& quality_arg) {
            const std::string key = key_arg.as("key");
            const auto quality = quality_arg.as("quality");
            const Context context = context_arg(kv, probe_queries);
            if (quality) {
              KVPACK_ARG_CHECK(quality->size() == self.codecs().size(),
                               "quality: expected one value per codec ("
                                   << self.codecs().size() << "), got " << quality->size());
              for (const double q : *quality)
                KVPACK_ARG_CHECK(std::isfinite(q), "quality: expected finite values, got " << q);
            }
            py::gil_scoped_release release;
            self.put(key, context.layers, context.probes, quality.value_or(std::vector<double>{}));
          },
          py::arg("key"), py::arg("kv"), py::arg("probe_queries") = py::none(),
          py::arg("quality") = py::none())
      .def(
          "get",
          [](TieredStore& self, const Arg<std::string>& key) -> py::object {
            std::optional<GetResult> result;
            const std::string name = key.as("key");
            {
              py::gil_scoped_release release;
              result = self.get(name);
            }
            if (!result) return py::none();
            py::dict out = decoded_dict(std::move(result->kv));
            out["tier"] = result->tier;
            out["bytes"] = result->bytes;
            out["io_seconds"] = result->io_seconds;
            out["decode_seconds"] = result->decode_seconds;
            out["quality"] = result->quality;
            return std::move(out);
          },
          py::arg("key"))
      .def(
          "contains",
          [](TieredStore& self, const Arg<std::string>& key_arg) {
            const std::string key = key_arg.as("key");
            py::gil_scoped_release release;
            return self.contains(key);
          },
          py::arg("key"))
      .def(
          "remove",
          [](TieredStore& self, const Arg<std::string>& key_arg) {
            const std::string key = key_arg.as("key");
            py::gil_scoped_release release;
            return self.remove(key);
          },
          py::arg("key"))
      .def(
          "prefetch",
          [](TieredStore& self, const Arg<std::string>& key_arg) {
            const std::string key = key_arg.as("key");
            py::gil_scoped_release release;
            self.prefetch(key);
          },
          py::arg("key"))
      .def("stats", [](const TieredStore& self) { return store_stats_dict(self.stats()); })
      .def(
          "where",
          [](const TieredStore& self, const Arg<std::string>& key) -> py::object {
            const auto location = self.where(key.as("key"));
            if (!location) return py::none();
            return py::make_tuple(location->first, location->second.name());
          },
          py::arg("key"))
      .def_property_readonly("codecs",
                             [](const TieredStore& self) {
                               std::vector<std::string> names;
                               for (const Codec& codec : self.codecs())
                                 names.push_back(codec.name());
                               return names;
                             })
      .def_property_readonly("bandwidths", &TieredStore::bandwidths);
}

}  // namespace kvpack::bindings
