"""
kvpack C++/CUDA core (private; use the kvpack package)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
from . import methods
__all__: list[str] = ['ClusterIndex', 'EvictionCache', 'QuantizedKV', 'QuestIndex', 'RecallCache', 'TieredStore', 'accumulated_attention', 'adjacent_similarity', 'attention', 'budget_tokens', 'cluster_slot', 'compress', 'cpu_target', 'cpu_targets', 'cuda_available', 'cuda_compiled', 'decode_blob', 'encode_blob', 'get_num_threads', 'held_attention', 'kmeans', 'methods', 'parse_codec', 'place', 'pyramid_budgets', 'quantized_attention', 'recall_step', 'set_num_threads', 'xxh3', 'xxh64']
class ClusterIndex:
    def __init__(self, keys: typing.Any, n_clusters: typing.SupportsInt | typing.SupportsIndex = 0, sink: typing.SupportsInt | typing.SupportsIndex = 16, iters: typing.SupportsInt | typing.SupportsIndex = 20, seed: typing.SupportsInt | typing.SupportsIndex = 0, init: typing.Any = 'kmeans++', append_interval: typing.SupportsInt | typing.SupportsIndex = 320, append_clusters: typing.SupportsInt | typing.SupportsIndex = 8, tokens_per_cluster: typing.SupportsInt | typing.SupportsIndex = 80) -> None:
        ...
    def append(self, new_keys: typing.Any) -> None:
        ...
    def select(self, q: typing.Any, budget: typing.SupportsInt | typing.SupportsIndex, window: typing.SupportsInt | typing.SupportsIndex = 0, per_query_head: bool = False) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def centroids(self) -> numpy.typing.NDArray[numpy.float32]:
        ...
    @property
    def clustered_until(self) -> int:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @property
    def heads(self) -> int:
        ...
    @property
    def labels(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def n_clusters(self) -> int:
        ...
    @property
    def offsets(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def order(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def sink(self) -> int:
        ...
    @property
    def sizes(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def tokens(self) -> int:
        ...
class QuestIndex:
    def __init__(self, keys: typing.Any, page_size: typing.SupportsInt | typing.SupportsIndex = 16) -> None:
        ...
    def append(self, new_keys: typing.Any) -> None:
        ...
    def select(self, q: typing.Any, budget: typing.SupportsInt | typing.SupportsIndex, per_query_head: bool = False) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @property
    def heads(self) -> int:
        ...
    @property
    def page_bounds(self) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    @property
    def page_size(self) -> int:
        ...
    @property
    def pages(self) -> int:
        ...
    @property
    def tokens(self) -> int:
        ...
class RecallCache:
    def __init__(self, budget: typing.SupportsInt | typing.SupportsIndex, method: typing.Any) -> None:
        ...
    def prefill(self, keys: typing.Any, values: typing.Any) -> None:
        ...
    def step(self, q: typing.Any, new_key: typing.Any, new_value: typing.Any) -> numpy.typing.NDArray[numpy.float32]:
        ...
    @property
    def last_candidates(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def last_selection(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def last_step(self) -> dict:
        ...
    @property
    def n_clusters(self) -> int:
        ...
    @property
    def nbytes(self) -> dict:
        ...
    @property
    def tokens(self) -> int:
        ...
    @property
    def total(self) -> dict:
        ...
class EvictionCache:
    def __init__(self, method: typing.Any, budget: typing.SupportsInt | typing.SupportsIndex, scale: typing.SupportsFloat | typing.SupportsIndex | None = None) -> None:
        ...
    def prefill(self, keys: typing.Any, values: typing.Any, queries: typing.Any = None, attention: typing.Any = None) -> None:
        ...
    def step(self, q: typing.Any, new_key: typing.Any, new_value: typing.Any) -> numpy.typing.NDArray[numpy.float32]:
        ...
    @property
    def budget(self) -> int:
        ...
    @property
    def keys(self) -> numpy.ndarray:
        ...
    @property
    def positions(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    @property
    def scores(self) -> numpy.typing.NDArray[numpy.float32]:
        ...
    @property
    def seen(self) -> int:
        ...
    @property
    def size(self) -> int:
        ...
    @property
    def values(self) -> numpy.ndarray:
        ...
class QuantizedKV:
    def __init__(self, keys: typing.Any, values: typing.Any, bits: typing.SupportsInt | typing.SupportsIndex = 2, group: typing.SupportsInt | typing.SupportsIndex = 32, residual: typing.SupportsInt | typing.SupportsIndex = 128) -> None:
        ...
    def attend(self, q: typing.Any, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, return_lse: bool = False, return_weights: bool = False, tail_keys: typing.Any = None, tail_values: typing.Any = None, softcap: typing.SupportsFloat | typing.SupportsIndex | None = None, sinks: typing.Any = None) -> tuple[numpy.typing.NDArray[numpy.float32], typing.Any, typing.Any]:
        ...
    def dequantize(self, keys_out: typing.Any = None, values_out: typing.Any = None) -> tuple:
        ...
    @property
    def bits(self) -> int:
        ...
    @property
    def dtype(self) -> numpy.dtype[typing.Any]:
        ...
    @property
    def group(self) -> int:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @property
    def heads(self) -> int:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def quantized(self) -> int:
        ...
    @property
    def residual(self) -> int:
        ...
    @property
    def tokens(self) -> int:
        ...
class TieredStore:
    def __init__(self, dram_bytes: typing.SupportsInt | typing.SupportsIndex, ssd_dir: str | None = None, ssd_bytes: typing.SupportsInt | typing.SupportsIndex = 0, redis_host: str | None = None, redis_port: typing.SupportsInt | typing.SupportsIndex = 6379, redis_db: typing.SupportsInt | typing.SupportsIndex = 0, redis_prefix: str = 'kvpack:', redis_bytes: typing.SupportsInt | typing.SupportsIndex = 0, policy: str = 'adaptive', alpha: typing.SupportsFloat | typing.SupportsIndex = 0.1, codecs: collections.abc.Sequence[str] | None = None, o_direct: bool = False, io_threads: typing.SupportsInt | typing.SupportsIndex = 2, streaming_rate: typing.SupportsFloat | typing.SupportsIndex = 0.5, bandwidths: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex] | None = None, decode_bandwidths: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex] | None = None, timeout_ms: typing.SupportsInt | typing.SupportsIndex = 2000, secret: bytes = b'', redis_cluster: collections.abc.Sequence[tuple[str, typing.SupportsInt | typing.SupportsIndex]] | None = None) -> None:
        ...
    def contains(self, key: str) -> bool:
        ...
    def get(self, key: str) -> typing.Any:
        ...
    def prefetch(self, key: str) -> None:
        ...
    def put(self, key: str, kv: typing.Any, probe_queries: typing.Any = None, quality: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex] | None = None) -> None:
        ...
    def remove(self, key: str) -> bool:
        ...
    def stats(self) -> dict:
        ...
    def where(self, key: str) -> typing.Any:
        ...
    @property
    def bandwidths(self) -> list[float]:
        ...
    @property
    def codecs(self) -> list[str]:
        ...
def _as_array(array: typing.Any) -> numpy.ndarray:
    """
    The NumPy view the bindings take of an array argument (for tests).
    """
def _data_pointer(array: typing.Any) -> int:
    """
    Address the core sees for a KV array (for zero-copy tests).
    """
def accumulated_attention(queries: typing.Any, keys: typing.Any, causal: bool = True, reduction: str = 'sum', per_query_head: bool = False, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, device: str = 'cpu') -> numpy.typing.NDArray[numpy.float32]:
    """
    Attention each key receives from a window of queries. See kvpack.accumulated_attention.
    """
def adjacent_similarity(keys: typing.Any) -> numpy.typing.NDArray[numpy.float32]:
    """
    Cosine similarity of each key with the next; see kvpack.adjacent_similarity.
    """
def attention(q: typing.Any, keys: typing.Any, values: typing.Any, indices: typing.Any = None, bias: typing.Any = None, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, return_lse: bool = False, return_weights: bool = False, device: str = 'cpu') -> tuple:
    """
    Decode attention; returns (out, lse or None, weights or None). See kvpack.attention.
    """
def budget_tokens(budget: typing.Any, tokens: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Slots a budget stands for over `tokens`: an int token count as given, a float share of the tokens rounded half up.
    """
def cluster_slot(key: bytes) -> int:
    """
    The Redis Cluster hash slot of a Redis key (CRC16 of its hash tag mod 16384), as CLUSTER KEYSLOT gives it.
    """
def compress(keys: typing.Any, values: typing.Any, method: typing.Any, budget: typing.Any, queries: typing.Any = None, attention: typing.Any = None, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, inv_freq: typing.Any = None, rotary_scaling: typing.SupportsFloat | typing.SupportsIndex | None = None, first_position: typing.SupportsInt | typing.SupportsIndex | None = None) -> dict:
    """
    Prefill-time compression; see kvpack.compress.
    """
def cpu_target() -> str:
    """
    Instruction set of the CPU kernels in use: the best build this processor runs, or the one the environment variable KVPACK_CPU_TARGET names ('native' and 'default' for a build of one target).
    """
def cpu_targets() -> list[str]:
    """
    Every build of the CPU kernels this processor runs, best first.
    """
def cuda_available() -> bool:
    """
    True when the CUDA backend is built and a GPU is usable.
    """
def cuda_compiled() -> bool:
    """
    True when kvpack was built with its CUDA backend.
    """
def decode_blob(blob: bytes) -> dict:
    ...
def encode_blob(key: str, kv: typing.Any, codec: str, probe_queries: typing.Any = None) -> bytes:
    ...
def get_num_threads() -> int:
    """
    Threads used by kvpack's parallel loops: those set by set_num_threads, else the OpenMP runtime's count (OMP_NUM_THREADS, or torch.set_num_threads in a process with torch: both share one OpenMP runtime and its workers in a source build; the wheel carries its own libgomp, so there the two counts are set apart).
    """
def held_attention(queries: typing.Any, keys: typing.Any, values: typing.Any, positions: typing.Any, first_decoded: typing.SupportsInt | typing.SupportsIndex, first_query: typing.SupportsInt | typing.SupportsIndex, bias: typing.Any = None, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, softcap: typing.SupportsFloat | typing.SupportsIndex | None = None, window: typing.SupportsInt | typing.SupportsIndex | None = None, sinks: typing.Any = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    One decode step of a batch over one layer's cache: held slots (at positions, -1 empty) then decoded tokens from first_decoded, scores capped by softcap, seen within window positions, with a sink logit per query head; returns [batch, new, heads_q, head_dim].
    """
def kmeans(x: typing.Any, n_clusters: typing.SupportsInt | typing.SupportsIndex, iters: typing.SupportsInt | typing.SupportsIndex = 20, seed: typing.SupportsInt | typing.SupportsIndex = 0, spherical: bool = True, init: typing.Any = 'kmeans++', init_centroids: typing.Any = None, device: str = 'cpu') -> dict:
    """
    k-means; see kvpack.kmeans.
    """
def parse_codec(name: str) -> str:
    """
    The canonical name of a codec; ValueError for an unknown one.
    """
def place(options: collections.abc.Sequence[collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex]]], priorities: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], capacities: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> list[int]:
    """
    The placement of items given as lists of (tier, bytes, utility) options: an option index per item, -1 for evicted.
    """
def pyramid_budgets(budget: typing.Any, layers: typing.SupportsInt | typing.SupportsIndex, tokens: typing.SupportsInt | typing.SupportsIndex, beta: typing.SupportsFloat | typing.SupportsIndex) -> list[int]:
    """
    PyramidKV's budgets per layer; see kvpack.pyramid_budgets.
    """
def quantized_attention(quantized: typing.Any, queries: typing.Any, tail_keys: typing.Any, tail_values: typing.Any, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, softcap: typing.SupportsFloat | typing.SupportsIndex | None = None, sinks: typing.Any = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    Decode attention of a batch, one QuantizedKV per row, looped in C++: out[b, i] is quantized[b].attend(queries[b, i], scale, softcap, sinks, tail_keys[b, :, :seen], tail_values[b, :, :seen]) with seen = decoded - new + i + 1; scores capped by softcap, a sink logit per query head joining the softmax. queries: float32 [batch, new, heads_q, head_dim]; tail_keys, tail_values: [batch, heads_kv, decoded, head_dim] in any KV dtype, the tokens decoded since the quantization (each head's rows contiguous; a slice of a buffer with spare room is read in place). Returns float32 [batch, new, heads_q, head_dim].
    """
def recall_step(caches: typing.Any, queries: typing.Any, keys: typing.Any, values: typing.Any, scale: typing.SupportsFloat | typing.SupportsIndex | None = None, softcap: typing.SupportsFloat | typing.SupportsIndex | None = None, sinks: typing.Any = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    One decode step of a batch, one RecallCache per row, looped in C++: out[b, i] is caches[b].step(queries[b, i], keys[b, :, i], values[b, :, i]), rows in turn and each row's positions in order; scores scaled by scale (None: 1/sqrt(head_dim)), capped by softcap, a sink logit per query head joining the softmax. queries: float32 [batch, new, heads_q, head_dim]; keys, values: [batch, heads_kv, new, head_dim] in the caches' dtype (each head_dim row contiguous; strided views are read in place). Returns float32 [batch, new, heads_q, head_dim].
    """
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Sets the threads used by kvpack's parallel loops (>= 1), from then on independent of the OpenMP runtime's count.
    """
def xxh3(data: bytes, seed: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
    """
    XXH3 (64-bit) of bytes (the blob checksum).
    """
def xxh64(data: bytes, seed: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
    """
    XXH64 of bytes (checksum of version 1 blobs).
    """
__version__: str = '0.1.0'
