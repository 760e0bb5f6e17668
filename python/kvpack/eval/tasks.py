"""Text and synthetic long-context tasks for the tiny LM, at the byte level (its tokenizer
is :mod:`kvpack.models.byte_tokenizer`).

The corpus is text every machine with Python and Debian has: the Python standard
library's sources and the plain-text documentation under /usr/share/doc (gzip files
decompressed). Files are split into train and held-out by a hash of their path, so
the split is the same wherever the files are the same; the held-out text comes from the
standard library only (held-out documentation files are left out of both), so it does not
change with the Debian packages a machine has.

Pass-key retrieval follows the usual prompt: filler text, one sentence with a random
five-digit key at a random depth, and the question at the end. Key-value lookup is
its dense form: many "key -> value" lines followed by queries on some of them.
"""

from __future__ import annotations

import gzip
import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..models.byte_tokenizer import BOS, encode

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def _held_out(path: str) -> bool:
    return zlib.crc32(path.encode()) % 50 == 0


@dataclass
class Corpus:
    """Concatenated training and held-out text as uint8 arrays, and where it came from."""

    train: np.ndarray
    held_out: np.ndarray
    files: int
    sources: tuple[str, ...]


@lru_cache(maxsize=1)
def corpus(max_doc_bytes: int = 1 << 20) -> Corpus:
    """The Python standard library's sources (no site-packages) and /usr/share/doc.

    Parameters
    ----------
    max_doc_bytes : int
        Longest file kept, after decompression (skips the few huge changelogs).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    doc = Path("/usr/share/doc")
    paths = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    if doc.is_dir():
        paths += sorted(
            p for p in doc.rglob("*") if p.is_file() and not p.is_symlink() and _is_text(p)
        )
    train, held_out = [], []
    for path in paths:
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if not data or len(data) > max_doc_bytes or b"\0" in data[:4096]:
            continue
        in_stdlib = path.is_relative_to(stdlib)
        if not _held_out(str(path.relative_to(stdlib if in_stdlib else doc))):
            train.append(data)
        elif in_stdlib:  # held-out text is the standard library's alone: the same on
            held_out.append(data)  # every machine with this Python, whatever is installed
    if not train or not held_out:
        raise RuntimeError("corpus: found no text under the standard library or /usr/share/doc")
    join = lambda docs: np.frombuffer(b"\n\n".join(docs), dtype=np.uint8)  # noqa: E731
    return Corpus(join(train), join(held_out), len(train) + len(held_out), (str(stdlib), str(doc)))


def _is_text(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix in ("", ".txt", ".gz", ".md", ".rst") and not name.endswith(
        (".png.gz", ".pdf.gz", ".html.gz")
    )


def _text_window(rng: np.random.Generator, text: np.ndarray, length: int) -> bytes:
    start = int(rng.integers(0, len(text) - length))
    return text[start : start + length].tobytes()


def _filler(rng: np.random.Generator, text: np.ndarray | None, length: int) -> bytes:
    """``length`` bytes of haystack: repeated filler sentences, or natural text."""
    if text is None:
        repeated = FILLER.encode() * (length // len(FILLER) + 2)
        start = int(rng.integers(0, len(FILLER)))
        return repeated[start : start + length]
    return _text_window(rng, text, length).replace(b"pass key", b"pass-key")


def passkey_sample(
    rng: np.random.Generator,
    length: int,
    text: np.ndarray | None = None,
    depth: float | None = None,
) -> tuple[list[int], int, str]:
    """One pass-key prompt of exactly ``length`` tokens, its answer start, and the key.

    Parameters
    ----------
    rng : numpy Generator
    length : int
        Tokens of prompt and answer together (BOS included).
    text : uint8 array, optional
        Natural text to draw the haystack from; the repeated filler when None.
    depth : float, optional
        Where the key sits, 0 (start) to 1 (end); uniform when None.

    Returns
    -------
    ids : list of int
        Prompt followed by the answer (" 12345.").
    answer_start : int
        Index in ``ids`` of the answer's first token.
    key : str
    """
    key = f"{int(rng.integers(10000, 100000))}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()
    answer = f" {key}.".encode()
    fixed = 1 + len(PASSKEY_INTRO) + len(needle) + len(PASSKEY_QUESTION) + len(answer)
    hay = length - fixed
    if hay < 0:
        raise ValueError(f"length: a pass-key prompt needs at least {fixed} tokens, got {length}")
    where = round((rng.random() if depth is None else depth) * hay)
    haystack = _filler(rng, text, hay)
    body = PASSKEY_INTRO.encode() + haystack[:where] + needle + haystack[where:]
    prompt = encode(body + PASSKEY_QUESTION.encode())
    return prompt + list(answer), len(prompt), key


def kv_lookup_sample(rng: np.random.Generator, length: int) -> list[int]:
    """``length`` tokens of "key -> value" lines, then queries that repeat some of them."""
    lines, queries = [], []
    used = 0
    budget = length - 1
    keys = rng.choice(90000, size=budget // 16, replace=False) + 10000
    n_pairs = max(1, len(keys) * 2 // 3)
    pairs = [(f"{k}", f"{int(rng.integers(10000, 100000))}") for k in keys[:n_pairs]]
    for k, v in pairs:
        lines.append(f"key {k} -> {v}\n")
        used += len(lines[-1])
    used += 1
    lines.append("\n")
    while used < budget:
        k, v = pairs[int(rng.integers(0, len(pairs)))]
        queries.append(f"key {k} -> {v}\n")
        used += len(queries[-1])
    return encode("".join(lines + queries))[:length]


REPEAT_ALPHABETS = {"letters": b"abcdefghijklmnopqrstuvwxyz0123456789 ", "digits": b"0123456789"}


def repeat_sample(
    rng: np.random.Generator,
    length: int,
    max_period: int | None = None,
    alphabet: str = "letters",
) -> list[int]:
    """``length`` tokens of one random string repeated: every token after the first copy
    is predictable by looking back (the induction pattern retrieval builds on).

    The period is uniform in [8, ``length // 2``) by default, or in [4, ``max_period``]
    (short periods repeat many times: a denser signal). Over the ten ``"digits"`` the same
    symbol recurs within a period, so one token of context no longer says where to copy
    from: the model has to match longer prefixes, as it must for pass keys like 86556.
    """
    if alphabet not in REPEAT_ALPHABETS:
        raise ValueError(f"alphabet: expected one of {list(REPEAT_ALPHABETS)}, got {alphabet!r}")
    symbols = np.frombuffer(REPEAT_ALPHABETS[alphabet], dtype=np.uint8)
    if max_period is None:
        period = int(rng.integers(8, max(9, (length - 1) // 2)))
    else:
        period = int(rng.integers(4, max_period + 1))
    string = symbols[rng.integers(0, symbols.size, size=period)]
    body = np.tile(string, (length - 1) // period + 1)[: length - 1]
    return [BOS, *body.tolist()]
