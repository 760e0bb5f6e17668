"""
Every KV-cache method kvpack implements, as a small parameter object.

    kvpack.methods.SnapKV(window=16)           # the defaults live in the C++ core
    kvpack.compress(k, v, kvpack.methods.SnapKV(window=16), 0.25, queries=q)
    kvpack.hf.make_cache(model, kvpack.methods.ClusterKV(n_clusters=64), budget=256)

Each class wraps the core's parameter struct of its method, so a default exists once
(in C++) and a bad value raises when it is set, naming the parameter. Wherever a
method is taken, its name is a shorthand for its defaults (``"snapkv"``), with
parameters as keywords (``compress(k, v, "snapkv", 0.25, window=16)``).

Attributes of every class: ``name`` (the shorthand), ``kind`` (``"compress"``: kept,
merged or dropped to the budget at prefill; ``"recall"``: the whole cache kept, the
budget recalled at each decode step; ``"quantize"``: low-bit codes, the latest budget
tokens exact) and ``params`` (parameter names). Objects have ``replace(**params)``
and ``as_dict()``, compare by value and pickle.
"""
from __future__ import annotations
from kvpack._core import methods as _core_methods
import typing
from typing import Any
from typing import Any as Method
__all__: list = ['CaM', 'ClusterKV', 'ClusterKVRefined', 'ExpectedAttention', 'Full', 'H2O', 'KIVI', 'KVMerger', 'KeyDiff', 'Method', 'Quest', 'REGISTRY', 'SnapKV', 'StreamingLLM', 'names', 'resolve']
class Full:
    """
    No compression: every token kept (the reference).
    
    Parameters
    ----------
    None.
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'full'
    params: typing.ClassVar[tuple] = tuple()
    def __copy__(self: Full) -> Full:
        ...
    def __deepcopy__(self: Full, arg0: dict) -> Full:
        ...
    def __eq__(self: Full, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: Full) -> dict:
        ...
    def __init__(self: Full, *args, **kwargs) -> None:
        ...
    def __repr__(self: Full) -> str:
        ...
    def __setstate__(self: Full, arg0: dict) -> None:
        ...
    def as_dict(self: Full) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: Full, **kwargs) -> Full:
        """
        A copy with the given parameters changed.
        """
class StreamingLLM:
    """
    StreamingLLM: the attention sinks and the latest tokens.
    
    Parameters
    ----------
    sinks : int, default 4
        First tokens always kept (attention sinks).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'streaming_llm'
    params: typing.ClassVar[tuple] = ('sinks')
    def __copy__(self: StreamingLLM) -> StreamingLLM:
        ...
    def __deepcopy__(self: StreamingLLM, arg0: dict) -> StreamingLLM:
        ...
    def __eq__(self: StreamingLLM, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: StreamingLLM) -> dict:
        ...
    def __init__(self: StreamingLLM, *args, **kwargs) -> None:
        ...
    def __repr__(self: StreamingLLM) -> str:
        ...
    def __setstate__(self: StreamingLLM, arg0: dict) -> None:
        ...
    def as_dict(self: StreamingLLM) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: StreamingLLM, **kwargs) -> StreamingLLM:
        """
        A copy with the given parameters changed.
        """
    @property
    def sinks(self) -> typing.Any:
        """
        int: First tokens always kept (attention sinks).
        """
    @sinks.setter
    def sinks(self, arg1: typing.Any) -> None:
        ...
class H2O:
    """
    H2O: the heavy hitters by accumulated attention and the latest tokens.
    
    Parameters
    ----------
    recent_ratio : float, default 0.5
        Share of the budget held by the latest tokens.
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'h2o'
    params: typing.ClassVar[tuple] = ('recent_ratio', 'adaptive', 'adaptive_floor')
    def __copy__(self: H2O) -> H2O:
        ...
    def __deepcopy__(self: H2O, arg0: dict) -> H2O:
        ...
    def __eq__(self: H2O, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: H2O) -> dict:
        ...
    def __init__(self: H2O, *args, **kwargs) -> None:
        ...
    def __repr__(self: H2O) -> str:
        ...
    def __setstate__(self: H2O, arg0: dict) -> None:
        ...
    def as_dict(self: H2O) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: H2O, **kwargs) -> H2O:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def recent_ratio(self) -> typing.Any:
        """
        float: Share of the budget held by the latest tokens.
        """
    @recent_ratio.setter
    def recent_ratio(self, arg1: typing.Any) -> None:
        ...
class SnapKV:
    """
    SnapKV: the tokens the observation window attends most (max-pooled), and the window.
    
    Parameters
    ----------
    window : int, default 32
        Observation window: the prompt's last queries, and tokens always kept.
    kernel : int, default 5
        Max-pooling width over neighbouring tokens (odd).
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'snapkv'
    params: typing.ClassVar[tuple] = ('window', 'kernel', 'adaptive', 'adaptive_floor')
    def __copy__(self: SnapKV) -> SnapKV:
        ...
    def __deepcopy__(self: SnapKV, arg0: dict) -> SnapKV:
        ...
    def __eq__(self: SnapKV, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: SnapKV) -> dict:
        ...
    def __init__(self: SnapKV, *args, **kwargs) -> None:
        ...
    def __repr__(self: SnapKV) -> str:
        ...
    def __setstate__(self: SnapKV, arg0: dict) -> None:
        ...
    def as_dict(self: SnapKV) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: SnapKV, **kwargs) -> SnapKV:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def kernel(self) -> typing.Any:
        """
        int: Max-pooling width over neighbouring tokens (odd).
        """
    @kernel.setter
    def kernel(self, arg1: typing.Any) -> None:
        ...
    @property
    def window(self) -> typing.Any:
        """
        int: Observation window: the prompt's last queries, and tokens always kept.
        """
    @window.setter
    def window(self, arg1: typing.Any) -> None:
        ...
class KeyDiff:
    """
    KeyDiff: the tokens whose keys are least similar (cosine) to the mean normalised key.
    
    Parameters
    ----------
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'keydiff'
    params: typing.ClassVar[tuple] = ('adaptive', 'adaptive_floor')
    def __copy__(self: KeyDiff) -> KeyDiff:
        ...
    def __deepcopy__(self: KeyDiff, arg0: dict) -> KeyDiff:
        ...
    def __eq__(self: KeyDiff, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: KeyDiff) -> dict:
        ...
    def __init__(self: KeyDiff, *args, **kwargs) -> None:
        ...
    def __repr__(self: KeyDiff) -> str:
        ...
    def __setstate__(self: KeyDiff, arg0: dict) -> None:
        ...
    def as_dict(self: KeyDiff) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: KeyDiff, **kwargs) -> KeyDiff:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
class ExpectedAttention:
    """
    Expected Attention: the tokens that queries still to come, modelled from the prompt's query statistics, are expected to attend most, weighted by value norm.
    
    Parameters
    ----------
    future_positions : int, default 512
        Positions after the last query the rotation of future queries is averaged over.
    sinks : int, default 4
        First tokens always kept; their queries stay out of the statistics.
    covariance : bool, default True
        Add the queries' covariance term (False: the mean query alone).
    value_norm : bool, default True
        Scale each score by the norm of its value.
    epsilon : float, default 0.0
        Added to each score before the value-norm scaling.
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'expected_attention'
    params: typing.ClassVar[tuple] = ('future_positions', 'sinks', 'covariance', 'value_norm', 'epsilon', 'adaptive', 'adaptive_floor')
    def __copy__(self: ExpectedAttention) -> ExpectedAttention:
        ...
    def __deepcopy__(self: ExpectedAttention, arg0: dict) -> ExpectedAttention:
        ...
    def __eq__(self: ExpectedAttention, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: ExpectedAttention) -> dict:
        ...
    def __init__(self: ExpectedAttention, *args, **kwargs) -> None:
        ...
    def __repr__(self: ExpectedAttention) -> str:
        ...
    def __setstate__(self: ExpectedAttention, arg0: dict) -> None:
        ...
    def as_dict(self: ExpectedAttention) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: ExpectedAttention, **kwargs) -> ExpectedAttention:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def covariance(self) -> typing.Any:
        """
        bool: Add the queries' covariance term (False: the mean query alone).
        """
    @covariance.setter
    def covariance(self, arg1: typing.Any) -> None:
        ...
    @property
    def epsilon(self) -> typing.Any:
        """
        float: Added to each score before the value-norm scaling.
        """
    @epsilon.setter
    def epsilon(self, arg1: typing.Any) -> None:
        ...
    @property
    def future_positions(self) -> typing.Any:
        """
        int: Positions after the last query the rotation of future queries is averaged over.
        """
    @future_positions.setter
    def future_positions(self, arg1: typing.Any) -> None:
        ...
    @property
    def sinks(self) -> typing.Any:
        """
        int: First tokens always kept; their queries stay out of the statistics.
        """
    @sinks.setter
    def sinks(self, arg1: typing.Any) -> None:
        ...
    @property
    def value_norm(self) -> typing.Any:
        """
        bool: Scale each score by the norm of its value.
        """
    @value_norm.setter
    def value_norm(self, arg1: typing.Any) -> None:
        ...
class CaM:
    """
    CaM: StreamingLLM's choice, each evicted value merged into the kept ones with the probability its attention gives.
    
    Parameters
    ----------
    sinks : int, default 4
        First tokens always kept.
    merge_window : int, default 32
        Successors an evicted value is spread over.
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'cam'
    params: typing.ClassVar[tuple] = ('sinks', 'merge_window')
    def __copy__(self: CaM) -> CaM:
        ...
    def __deepcopy__(self: CaM, arg0: dict) -> CaM:
        ...
    def __eq__(self: CaM, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: CaM) -> dict:
        ...
    def __init__(self: CaM, *args, **kwargs) -> None:
        ...
    def __repr__(self: CaM) -> str:
        ...
    def __setstate__(self: CaM, arg0: dict) -> None:
        ...
    def as_dict(self: CaM) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: CaM, **kwargs) -> CaM:
        """
        A copy with the given parameters changed.
        """
    @property
    def merge_window(self) -> typing.Any:
        """
        int: Successors an evicted value is spread over.
        """
    @merge_window.setter
    def merge_window(self, arg1: typing.Any) -> None:
        ...
    @property
    def sinks(self) -> typing.Any:
        """
        int: First tokens always kept.
        """
    @sinks.setter
    def sinks(self, arg1: typing.Any) -> None:
        ...
class KVMerger:
    """
    KVMerger: runs of adjacent similar keys merged with Gaussian weights.
    
    Parameters
    ----------
    protect_recent : float | None, default None
        Share of the tokens in the never-merged recent window (None: the paper's schedule, 17% at a 50% budget to 8% at 35%).
    protect_heavy : float | None, default None
        Share of the tokens protected as heavy hitters (None: 12% at 50% to 2% at 35%).
    sigma : float | str, default 5.0
        Gaussian kernel width, or 'auto': per run, the RMS member-pivot distance.
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'compress'
    name: typing.ClassVar[str] = 'kvmerger'
    params: typing.ClassVar[tuple] = ('protect_recent', 'protect_heavy', 'sigma')
    def __copy__(self: KVMerger) -> KVMerger:
        ...
    def __deepcopy__(self: KVMerger, arg0: dict) -> KVMerger:
        ...
    def __eq__(self: KVMerger, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: KVMerger) -> dict:
        ...
    def __init__(self: KVMerger, *args, **kwargs) -> None:
        ...
    def __repr__(self: KVMerger) -> str:
        ...
    def __setstate__(self: KVMerger, arg0: dict) -> None:
        ...
    def as_dict(self: KVMerger) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: KVMerger, **kwargs) -> KVMerger:
        """
        A copy with the given parameters changed.
        """
    @property
    def protect_heavy(self) -> typing.Any:
        """
        float | None: Share of the tokens protected as heavy hitters (None: 12% at 50% to 2% at 35%).
        """
    @protect_heavy.setter
    def protect_heavy(self, arg1: typing.Any) -> None:
        ...
    @property
    def protect_recent(self) -> typing.Any:
        """
        float | None: Share of the tokens in the never-merged recent window (None: the paper's schedule, 17% at a 50% budget to 8% at 35%).
        """
    @protect_recent.setter
    def protect_recent(self, arg1: typing.Any) -> None:
        ...
    @property
    def sigma(self) -> typing.Any:
        """
        float | str: Gaussian kernel width, or 'auto': per run, the RMS member-pivot distance.
        """
    @sigma.setter
    def sigma(self, arg1: typing.Any) -> None:
        ...
class ClusterKV:
    """
    ClusterKV: keys clustered by cosine k-means; each decode step recalls whole clusters until the budget is filled.
    
    Parameters
    ----------
    n_clusters : int | None, default None
        Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, raised so the mean cluster holds at most budget / 12 tokens).
    tokens_per_cluster : int, default 80
        Mean cluster size the automatic n_clusters aims at.
    sink : int, default 16
        First tokens never clustered, always attended.
    window : int, default 0
        Most recent tokens always attended.
    iters : int, default 20
        k-means rounds.
    seed : int, default 0
        k-means seed.
    init : str, default 'kmeans++'
        k-means initialisation: 'kmeans++' or 'random'.
    append_interval : int, default 320
        Decoded tokens clustered together (m).
    append_clusters : int, default 8
        Clusters made of them (C+).
    refine : int, default 1
        Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
    recall_steps : int, default 1
        R: tokens recalled in the last R steps stay in the fast tier.
    per_query_head : bool, default False
        Each query head selects its own tokens (GQA) instead of one set per KV head.
    fast_tier : bool, default False
        Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
    slow_bits : int, default 0
        0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
    slow_group : int, default 128
        Tokens per key range and channels per value range of the slow tier's codes.
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'recall'
    name: typing.ClassVar[str] = 'clusterkv'
    params: typing.ClassVar[tuple] = ('n_clusters', 'tokens_per_cluster', 'sink', 'window', 'iters', 'seed', 'init', 'append_interval', 'append_clusters', 'refine', 'recall_steps', 'per_query_head', 'fast_tier', 'slow_bits', 'slow_group', 'adaptive', 'adaptive_floor')
    def __copy__(self: ClusterKV) -> ClusterKV:
        ...
    def __deepcopy__(self: ClusterKV, arg0: dict) -> ClusterKV:
        ...
    def __eq__(self: ClusterKV, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: ClusterKV) -> dict:
        ...
    def __init__(self: ClusterKV, *args, **kwargs) -> None:
        ...
    def __repr__(self: ClusterKV) -> str:
        ...
    def __setstate__(self: ClusterKV, arg0: dict) -> None:
        ...
    def as_dict(self: ClusterKV) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: ClusterKV, **kwargs) -> ClusterKV:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def append_clusters(self) -> typing.Any:
        """
        int: Clusters made of them (C+).
        """
    @append_clusters.setter
    def append_clusters(self, arg1: typing.Any) -> None:
        ...
    @property
    def append_interval(self) -> typing.Any:
        """
        int: Decoded tokens clustered together (m).
        """
    @append_interval.setter
    def append_interval(self, arg1: typing.Any) -> None:
        ...
    @property
    def fast_tier(self) -> typing.Any:
        """
        bool: Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
        """
    @fast_tier.setter
    def fast_tier(self, arg1: typing.Any) -> None:
        ...
    @property
    def init(self) -> typing.Any:
        """
        str: k-means initialisation: 'kmeans++' or 'random'.
        """
    @init.setter
    def init(self, arg1: typing.Any) -> None:
        ...
    @property
    def iters(self) -> typing.Any:
        """
        int: k-means rounds.
        """
    @iters.setter
    def iters(self, arg1: typing.Any) -> None:
        ...
    @property
    def n_clusters(self) -> typing.Any:
        """
        int | None: Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, raised so the mean cluster holds at most budget / 12 tokens).
        """
    @n_clusters.setter
    def n_clusters(self, arg1: typing.Any) -> None:
        ...
    @property
    def per_query_head(self) -> typing.Any:
        """
        bool: Each query head selects its own tokens (GQA) instead of one set per KV head.
        """
    @per_query_head.setter
    def per_query_head(self, arg1: typing.Any) -> None:
        ...
    @property
    def recall_steps(self) -> typing.Any:
        """
        int: R: tokens recalled in the last R steps stay in the fast tier.
        """
    @recall_steps.setter
    def recall_steps(self, arg1: typing.Any) -> None:
        ...
    @property
    def refine(self) -> typing.Any:
        """
        int: Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
        """
    @refine.setter
    def refine(self, arg1: typing.Any) -> None:
        ...
    @property
    def seed(self) -> typing.Any:
        """
        int: k-means seed.
        """
    @seed.setter
    def seed(self, arg1: typing.Any) -> None:
        ...
    @property
    def sink(self) -> typing.Any:
        """
        int: First tokens never clustered, always attended.
        """
    @sink.setter
    def sink(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_bits(self) -> typing.Any:
        """
        int: 0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
        """
    @slow_bits.setter
    def slow_bits(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_group(self) -> typing.Any:
        """
        int: Tokens per key range and channels per value range of the slow tier's codes.
        """
    @slow_group.setter
    def slow_group(self, arg1: typing.Any) -> None:
        ...
    @property
    def tokens_per_cluster(self) -> typing.Any:
        """
        int: Mean cluster size the automatic n_clusters aims at.
        """
    @tokens_per_cluster.setter
    def tokens_per_cluster(self, arg1: typing.Any) -> None:
        ...
    @property
    def window(self) -> typing.Any:
        """
        int: Most recent tokens always attended.
        """
    @window.setter
    def window(self, arg1: typing.Any) -> None:
        ...
class ClusterKVRefined:
    """
    ClusterKV recalling 4x its budget in clusters, then keeping the budget tokens of highest exact q.k among them (kvpack's best recall configuration).
    
    Parameters
    ----------
    n_clusters : int | None, default None
        Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, raised so the mean cluster holds at most budget / 12 tokens).
    tokens_per_cluster : int, default 80
        Mean cluster size the automatic n_clusters aims at.
    sink : int, default 16
        First tokens never clustered, always attended.
    window : int, default 0
        Most recent tokens always attended.
    iters : int, default 20
        k-means rounds.
    seed : int, default 0
        k-means seed.
    init : str, default 'kmeans++'
        k-means initialisation: 'kmeans++' or 'random'.
    append_interval : int, default 320
        Decoded tokens clustered together (m).
    append_clusters : int, default 8
        Clusters made of them (C+).
    refine : int, default 4
        Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
    recall_steps : int, default 1
        R: tokens recalled in the last R steps stay in the fast tier.
    per_query_head : bool, default False
        Each query head selects its own tokens (GQA) instead of one set per KV head.
    fast_tier : bool, default False
        Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
    slow_bits : int, default 0
        0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
    slow_group : int, default 128
        Tokens per key range and channels per value range of the slow tier's codes.
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'recall'
    name: typing.ClassVar[str] = 'clusterkv_refined'
    params: typing.ClassVar[tuple] = ('n_clusters', 'tokens_per_cluster', 'sink', 'window', 'iters', 'seed', 'init', 'append_interval', 'append_clusters', 'refine', 'recall_steps', 'per_query_head', 'fast_tier', 'slow_bits', 'slow_group', 'adaptive', 'adaptive_floor')
    def __copy__(self: ClusterKVRefined) -> ClusterKVRefined:
        ...
    def __deepcopy__(self: ClusterKVRefined, arg0: dict) -> ClusterKVRefined:
        ...
    def __eq__(self: ClusterKVRefined, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: ClusterKVRefined) -> dict:
        ...
    def __init__(self: ClusterKVRefined, *args, **kwargs) -> None:
        ...
    def __repr__(self: ClusterKVRefined) -> str:
        ...
    def __setstate__(self: ClusterKVRefined, arg0: dict) -> None:
        ...
    def as_dict(self: ClusterKVRefined) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: ClusterKVRefined, **kwargs) -> ClusterKVRefined:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def append_clusters(self) -> typing.Any:
        """
        int: Clusters made of them (C+).
        """
    @append_clusters.setter
    def append_clusters(self, arg1: typing.Any) -> None:
        ...
    @property
    def append_interval(self) -> typing.Any:
        """
        int: Decoded tokens clustered together (m).
        """
    @append_interval.setter
    def append_interval(self, arg1: typing.Any) -> None:
        ...
    @property
    def fast_tier(self) -> typing.Any:
        """
        bool: Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
        """
    @fast_tier.setter
    def fast_tier(self, arg1: typing.Any) -> None:
        ...
    @property
    def init(self) -> typing.Any:
        """
        str: k-means initialisation: 'kmeans++' or 'random'.
        """
    @init.setter
    def init(self, arg1: typing.Any) -> None:
        ...
    @property
    def iters(self) -> typing.Any:
        """
        int: k-means rounds.
        """
    @iters.setter
    def iters(self, arg1: typing.Any) -> None:
        ...
    @property
    def n_clusters(self) -> typing.Any:
        """
        int | None: Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, raised so the mean cluster holds at most budget / 12 tokens).
        """
    @n_clusters.setter
    def n_clusters(self, arg1: typing.Any) -> None:
        ...
    @property
    def per_query_head(self) -> typing.Any:
        """
        bool: Each query head selects its own tokens (GQA) instead of one set per KV head.
        """
    @per_query_head.setter
    def per_query_head(self, arg1: typing.Any) -> None:
        ...
    @property
    def recall_steps(self) -> typing.Any:
        """
        int: R: tokens recalled in the last R steps stay in the fast tier.
        """
    @recall_steps.setter
    def recall_steps(self, arg1: typing.Any) -> None:
        ...
    @property
    def refine(self) -> typing.Any:
        """
        int: Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
        """
    @refine.setter
    def refine(self, arg1: typing.Any) -> None:
        ...
    @property
    def seed(self) -> typing.Any:
        """
        int: k-means seed.
        """
    @seed.setter
    def seed(self, arg1: typing.Any) -> None:
        ...
    @property
    def sink(self) -> typing.Any:
        """
        int: First tokens never clustered, always attended.
        """
    @sink.setter
    def sink(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_bits(self) -> typing.Any:
        """
        int: 0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
        """
    @slow_bits.setter
    def slow_bits(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_group(self) -> typing.Any:
        """
        int: Tokens per key range and channels per value range of the slow tier's codes.
        """
    @slow_group.setter
    def slow_group(self, arg1: typing.Any) -> None:
        ...
    @property
    def tokens_per_cluster(self) -> typing.Any:
        """
        int: Mean cluster size the automatic n_clusters aims at.
        """
    @tokens_per_cluster.setter
    def tokens_per_cluster(self, arg1: typing.Any) -> None:
        ...
    @property
    def window(self) -> typing.Any:
        """
        int: Most recent tokens always attended.
        """
    @window.setter
    def window(self, arg1: typing.Any) -> None:
        ...
class Quest:
    """
    Quest: pages of keys recalled per decode step by their per-channel bounds.
    
    Parameters
    ----------
    page_size : int, default 16
        Tokens per page.
    refine : int, default 1
        Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
    recall_steps : int, default 1
        R: tokens recalled in the last R steps stay in the fast tier.
    per_query_head : bool, default False
        Each query head selects its own tokens (GQA) instead of one set per KV head.
    fast_tier : bool, default False
        Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
    slow_bits : int, default 0
        0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
    slow_group : int, default 128
        Tokens per key range and channels per value range of the slow tier's codes.
    adaptive : bool, default False
        AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
    adaptive_floor : float, default 0.2
        With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'recall'
    name: typing.ClassVar[str] = 'quest'
    params: typing.ClassVar[tuple] = ('page_size', 'refine', 'recall_steps', 'per_query_head', 'fast_tier', 'slow_bits', 'slow_group', 'adaptive', 'adaptive_floor')
    def __copy__(self: Quest) -> Quest:
        ...
    def __deepcopy__(self: Quest, arg0: dict) -> Quest:
        ...
    def __eq__(self: Quest, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: Quest) -> dict:
        ...
    def __init__(self: Quest, *args, **kwargs) -> None:
        ...
    def __repr__(self: Quest) -> str:
        ...
    def __setstate__(self: Quest, arg0: dict) -> None:
        ...
    def as_dict(self: Quest) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: Quest, **kwargs) -> Quest:
        """
        A copy with the given parameters changed.
        """
    @property
    def adaptive(self) -> typing.Any:
        """
        bool: AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) by their pooled scores (False: budget each).
        """
    @adaptive.setter
    def adaptive(self, arg1: typing.Any) -> None:
        ...
    @property
    def adaptive_floor(self) -> typing.Any:
        """
        float: With adaptive: share of the budget each head keeps at least (AdaKV's safeguard; at least one slot).
        """
    @adaptive_floor.setter
    def adaptive_floor(self, arg1: typing.Any) -> None:
        ...
    @property
    def fast_tier(self) -> typing.Any:
        """
        bool: Copy recalled tokens into a fast tier kept for R steps (False: attend in place).
        """
    @fast_tier.setter
    def fast_tier(self, arg1: typing.Any) -> None:
        ...
    @property
    def page_size(self) -> typing.Any:
        """
        int: Tokens per page.
        """
    @page_size.setter
    def page_size(self, arg1: typing.Any) -> None:
        ...
    @property
    def per_query_head(self) -> typing.Any:
        """
        bool: Each query head selects its own tokens (GQA) instead of one set per KV head.
        """
    @per_query_head.setter
    def per_query_head(self, arg1: typing.Any) -> None:
        ...
    @property
    def recall_steps(self) -> typing.Any:
        """
        int: R: tokens recalled in the last R steps stay in the fast tier.
        """
    @recall_steps.setter
    def recall_steps(self, arg1: typing.Any) -> None:
        ...
    @property
    def refine(self) -> typing.Any:
        """
        int: Recall refine x budget candidates, then keep the budget tokens with the highest exact q.k among them (1: the method's own selection).
        """
    @refine.setter
    def refine(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_bits(self) -> typing.Any:
        """
        int: 0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many bits, ranked and attended from the codes (the last slow_group prompt tokens and the decoded ones exact).
        """
    @slow_bits.setter
    def slow_bits(self, arg1: typing.Any) -> None:
        ...
    @property
    def slow_group(self) -> typing.Any:
        """
        int: Tokens per key range and channels per value range of the slow tier's codes.
        """
    @slow_group.setter
    def slow_group(self, arg1: typing.Any) -> None:
        ...
class KIVI:
    """
    KIVI: keys quantized per channel and values per token to 2, 4 or 8 bits; the latest budget tokens kept in full precision.
    
    Parameters
    ----------
    bits : int, default 2
        Bits per code: 2, 4 or 8.
    group : int, default 32
        Tokens per key group and channels per value group.
    """
    __hash__: typing.ClassVar[None] = None
    kind: typing.ClassVar[str] = 'quantize'
    name: typing.ClassVar[str] = 'kivi'
    params: typing.ClassVar[tuple] = ('bits', 'group')
    def __copy__(self: KIVI) -> KIVI:
        ...
    def __deepcopy__(self: KIVI, arg0: dict) -> KIVI:
        ...
    def __eq__(self: KIVI, arg0: typing.Any) -> bool:
        ...
    def __getstate__(self: KIVI) -> dict:
        ...
    def __init__(self: KIVI, *args, **kwargs) -> None:
        ...
    def __repr__(self: KIVI) -> str:
        ...
    def __setstate__(self: KIVI, arg0: dict) -> None:
        ...
    def as_dict(self: KIVI) -> dict:
        """
        The parameters as {name: value}.
        """
    def replace(self: KIVI, **kwargs) -> KIVI:
        """
        A copy with the given parameters changed.
        """
    @property
    def bits(self) -> typing.Any:
        """
        int: Bits per code: 2, 4 or 8.
        """
    @bits.setter
    def bits(self, arg1: typing.Any) -> None:
        ...
    @property
    def group(self) -> typing.Any:
        """
        int: Tokens per key group and channels per value group.
        """
    @group.setter
    def group(self, arg1: typing.Any) -> None:
        ...
def names(kind: str | None = None) -> tuple[str, ...]:
    """
    Names of every method, or of one ``kind`` (``"compress"``, ``"recall"``,
        ``"quantize"``), in registry order.
    """
def resolve(method, **params) -> Method:
    """
    The method object ``method`` stands for: a name with ``params`` (its defaults
        for the rest), or a method object (``params`` then change a copy of it).
    """
REGISTRY: dict = {'full': Full, 'streaming_llm': StreamingLLM, 'h2o': H2O, 'snapkv': SnapKV, 'keydiff': KeyDiff, 'expected_attention': ExpectedAttention, 'cam': CaM, 'kvmerger': KVMerger, 'clusterkv': ClusterKV, 'clusterkv_refined': ClusterKVRefined, 'quest': Quest, 'kivi': KIVI}
