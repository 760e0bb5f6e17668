"""Every KV-cache method kvpack implements, as a small parameter object.

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

from typing import Any

from ._core import methods as _core_methods

#: Method name -> class, in the order methods are listed to users (the core's registry).
REGISTRY: dict[str, type] = dict(_core_methods.registry)

# One class per method, under its own name: kvpack.methods.SnapKV, ...
globals().update({cls.__name__: cls for cls in REGISTRY.values()})

__all__ = sorted(
    ["REGISTRY", "Method", "names", "resolve", *(c.__name__ for c in REGISTRY.values())]
)

#: Any method object.
Method = Any


def names(kind: str | None = None) -> tuple[str, ...]:
    """Names of every method, or of one ``kind`` (``"compress"``, ``"recall"``,
    ``"quantize"``), in registry order."""
    kinds = {cls.kind for cls in REGISTRY.values()}
    if kind is not None and kind not in kinds:
        raise ValueError(f"kind: expected one of {', '.join(sorted(kinds))}, got {kind!r}")
    return tuple(name for name, cls in REGISTRY.items() if kind in (None, cls.kind))


def resolve(method, **params) -> Method:
    """The method object ``method`` stands for: a name with ``params`` (its defaults
    for the rest), or a method object (``params`` then change a copy of it)."""
    if isinstance(method, str):
        if method not in REGISTRY:
            raise ValueError(f"method: expected one of {', '.join(REGISTRY)}, got {method!r}")
        return REGISTRY[method](**params)
    if type(method) not in REGISTRY.values():
        raise TypeError(
            f"method: expected a method name or a kvpack.methods object, got "
            f"{type(method).__name__}"
        )
    return method.replace(**params) if params else method
