"""Argument type errors that name the argument.

pybind11 answers a call whose argument it cannot convert with "incompatible function
arguments" and every overload's signature. Importing this module (``kvpack/__init__.py``
does it first) wraps the functions and methods of ``kvpack._core`` once, so such a call
raises a TypeError naming the first argument that does not fit its annotation instead.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Sequence
from typing import Any

from . import _core

_GENERIC = ("incompatible function arguments", "incompatible constructor arguments")

_SCALARS = {
    "typing.SupportsInt": ("an int", lambda x: hasattr(x, "__index__")),
    "typing.SupportsIndex": ("an int", lambda x: hasattr(x, "__index__")),
    "int": ("an int", lambda x: hasattr(x, "__index__")),
    "typing.SupportsFloat": ("a number", lambda x: isinstance(x, numbers.Real)),
    "float": ("a number", lambda x: isinstance(x, numbers.Real)),
    "str": ("a str", lambda x: isinstance(x, str)),
    "bytes": ("bytes", lambda x: isinstance(x, bytes)),
    "bool": ("a bool", lambda x: isinstance(x, bool) or type(x).__name__ == "bool_"),
    "None": ("None", lambda x: x is None),
}


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i].strip())
            start = i + len(separator)
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _fits(value: Any, annotation: str) -> tuple[bool, str]:
    """Whether ``value`` converts to ``annotation``, and the annotation in words; unknown
    annotations (arrays, classes of the module) always fit."""
    words, fits = [], False
    for option in _split(annotation, "|"):
        sequence = re.fullmatch(r"(?:collections\.abc\.Sequence|list)\[(.*)\]", option)
        if sequence:
            is_list = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
            fits |= is_list and all(_fits(item, sequence.group(1))[0] for item in value)
            words.append(f"a list ({_fits(None, sequence.group(1))[1]} each)")
        elif option in _SCALARS:
            word, check = _SCALARS[option]
            if word not in words:
                words.append(word)
            fits |= check(value)
        else:
            return True, option
    if "a number" in words and "an int" in words:  # SupportsFloat | SupportsIndex
        words.remove("an int")
    return fits, " or ".join(words)


def _named_error(signature: str, args: tuple, kwargs: dict) -> str | None:
    """The first argument of a call that does not fit ``signature`` (pybind11's
    ``name(a: int, b: str = 'x') -> T``), as "name: expected ..., got ..."."""
    match = re.match(r"\s*\w+\((.*)\)\s*->", signature)
    if not match:
        return None
    parameters = []
    for parameter in _split(match.group(1), ","):
        name, _, annotation = parameter.partition(":")
        parameters.append((name.strip(), _split(annotation, "=")[0] if annotation else ""))
    if parameters and parameters[0][0] == "self":
        parameters = parameters[1:]
    given = dict(zip((name for name, _ in parameters), args))
    given.update(kwargs)
    for name, annotation in parameters:
        if name in given and annotation:
            fits, words = _fits(given[name], annotation)
            if not fits:
                return f"{name}: expected {words}, got {type(given[name]).__name__}"
    return None


def _named(function, signature: str, bound: bool):
    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except TypeError as error:
            if not str(error).startswith(tuple(f"{function.__name__}(): {g}" for g in _GENERIC)):
                raise
            named = _named_error(signature, args[1:] if bound else args, kwargs)
            if named is None:
                raise
            raise TypeError(named) from None

    return call


def _signature(function) -> str | None:
    doc = getattr(function, "__doc__", None) or ""
    first = doc.lstrip().splitlines()[0] if doc.strip() else ""
    return first if re.match(r"\w+\(.*\)\s*->", first) else None


def name_argument_errors(module) -> None:
    """Wraps every function of ``module`` and every method of its classes (once)."""
    if getattr(module, "_arguments_named", False):
        return
    for name, value in list(vars(module).items()):
        if isinstance(value, type):
            for attribute, method in list(vars(value).items()):
                plain = callable(method) and not isinstance(method, (staticmethod, classmethod))
                signature = _signature(method) if plain else None
                if signature and (attribute == "__init__" or not attribute.startswith("__")):
                    setattr(value, attribute, _named(method, signature, bound=True))
        elif callable(value):
            signature = _signature(value)
            if signature:
                setattr(module, name, _named(value, signature, bound=False))
    module._arguments_named = True


name_argument_errors(_core)
