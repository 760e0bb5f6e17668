"""Long-context tasks in RULER's manner, generated locally with a model's own tokenizer.

Seven synthetic tasks of a given length in tokens: pass-key retrieval; needle in a
haystack with one needle, with several keys (distractors) and with several values of
one key; variable tracking (chains of assignments); common- and frequent-words
extraction. Haystacks are real English text every machine with Python has: the
docstrings of the standard library's modules. Each sample is scored as RULER scores
its synthetic tasks: the share of the expected answers found (case-insensitively) in
the model's output.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["TASKS", "RulerSample", "english_text", "make_sample", "score"]

#: The tasks, in the order tables list them.
TASKS = (
    "passkey",
    "single_needle",
    "multikey",
    "multivalue",
    "variable_tracking",
    "common_words",
    "frequent_words",
)

_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to "
    "memorize them. I will quiz you about the numbers afterwards.\n"
)


@dataclass
class RulerSample:
    """One prompt and what a correct answer contains."""

    task: str
    prompt: list[int]  # token ids of the model's tokenizer, BOS first when it has one
    answers: list[str]  # every one is expected in the output
    max_new_tokens: int
    depth: float | None = None  # where the needle sits (0 start, 1 end), for needle tasks
    text: str = field(default="", repr=False)  # the prompt as text
    question: int = 0  # the prompt's last tokens that ask the question (after the context)


@lru_cache(maxsize=1)
def english_text() -> str:
    """Docstrings of the standard library's top-level modules: English prose, the same
    on every machine with this Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    if not docs:
        raise RuntimeError("english_text: found no docstrings in the standard library")
    return "\n\n".join(docs)


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 9 letters from the haystack text."""
    found = sorted(set(re.findall(r"\b[a-z]{4,9}\b", english_text())))
    return tuple(found)


class _Builder:
    """Token-level assembly: pieces are tokenized on their own and concatenated, so a
    prompt can be fitted to an exact length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


@lru_cache(maxsize=4)
def _haystack_ids(tokenizer) -> tuple[int, ...]:
    return tuple(_Builder(tokenizer).ids(english_text()))


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _key_words(rng, count: int) -> list[str]:
    words = _words()
    picked = rng.choice(len(words), size=count, replace=False)
    return [words[i] for i in picked]


def _with_needles(rng, builder, length, head, needles, tail, depths):
    """Prompt ids of exactly ``length`` tokens: head, haystack with the needles at the
    given depths (shares of the haystack), tail."""
    head_ids, tail_ids = builder.ids(head), builder.ids(tail)
    needle_ids = [builder.ids(" " + n + " ") for n in needles]
    fixed = len(builder.bos) + len(head_ids) + len(tail_ids) + sum(len(n) for n in needle_ids)
    room = length - fixed
    if room < 16:
        raise ValueError(f"length: {length} tokens leave no room for a haystack ({fixed} fixed)")
    pool = _haystack_ids(builder.tokenizer)
    if room >= len(pool):
        raise ValueError(f"length: {length} tokens exceed the haystack text")
    start = int(rng.integers(0, len(pool) - room))
    hay = list(pool[start : start + room])
    cuts = sorted(round(d * room) for d in depths)
    order = np.argsort(depths, kind="stable")
    body, last = [], 0
    for cut, i in zip(cuts, order):
        body += hay[last:cut] + needle_ids[i]
        last = cut
    body += hay[last:]
    return builder.bos + head_ids + body + tail_ids


def _listing(rng, builder, length, words_for, head, tail):
    """Prompt ids of at most ``length`` tokens from the longest numbered word list
    ``words_for(n)`` (shuffled) that fits, n found by bisection."""
    head_ids, tail_ids = builder.ids(head), builder.ids(tail)
    seed = int(rng.integers(1 << 31))  # one shuffle per n: bisection sees the same lists

    def ids(n):
        items = words_for(n)
        items = [items[i] for i in np.random.default_rng([seed, n]).permutation(len(items))]
        text = "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items))
        return builder.bos + head_ids + builder.ids(text) + tail_ids

    low, high = 1, max(2, length)
    while low < high:  # the largest n whose prompt fits
        mid = (low + high + 1) // 2
        if len(ids(mid)) <= length:
            low = mid
        else:
            high = mid - 1
    prompt = ids(low)
    if len(prompt) > length:
        raise ValueError(f"length: {length} tokens are too few for a word list")
    return prompt


def make_sample(task: str, tokenizer, length: int, rng, depth: float | None = None):
    """One sample of ``task`` whose prompt is ``length`` tokens (word lists: at most).

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    tokenizer : transformers tokenizer
        The model's own.
    length : int
        Prompt tokens, BOS included.
    rng : numpy Generator
        Seeds keys, values, words and the haystack window.
    depth : float, optional
        Needle depth in [0, 1] for the needle tasks (others are spread evenly around it);
        uniform when None.

    Returns
    -------
    RulerSample
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a share in [0, 1], got {depth}")
    builder = _Builder(tokenizer)
    depth = float(rng.random()) if depth is None else depth
    if task == "passkey":
        key = str(int(rng.integers(10000, 100000)))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        head = (
            "There is an important piece of information hidden inside a lot of irrelevant "
            "text. Find it and memorize it. I will quiz you about it afterwards.\n"
        )
        tail = "\nWhat is the pass key? The pass key is"
        prompt = _with_needles(rng, builder, length, head, [needle], tail, [depth])
        return _sample(task, builder, prompt, [key], 12, depth, tail)
    if task in ("single_needle", "multikey", "multivalue"):
        keys = _key_words(rng, 4)
        values = [_number(rng) for _ in range(4)]
        if task == "single_needle":
            needles, answers = (
                [f"One of the special magic numbers for {keys[0]} is: {values[0]}."],
                [values[0]],
            )
        elif task == "multikey":  # three other keys distract
            needles = [
                f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)
            ]
            answers = [values[0]]
        else:  # four values of one key, all asked for
            needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in values]
            answers = values
        depths = [depth] + [(depth + (i + 1) / len(needles)) % 1.0 for i in range(len(needles) - 1)]
        if task == "multivalue":
            tail = (
                f"\nWhat are all the special magic numbers for {keys[0]} mentioned in the "
                f"provided text? The special magic numbers for {keys[0]} mentioned in the "
                "provided text are"
            )
        else:
            tail = (
                f"\nWhat is the special magic number for {keys[0]} mentioned in the provided "
                f"text? The special magic number for {keys[0]} mentioned in the provided text is"
            )
        prompt = _with_needles(rng, builder, length, _INTRO, needles, tail, depths)
        return _sample(task, builder, prompt, answers, 12 * len(answers), depth, tail)
    if task == "variable_tracking":
        names = ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=5)) for _ in range(5)]
        value = str(int(rng.integers(10000, 100000)))
        needles = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)
        ]
        depths = sorted(float(d) for d in rng.random(5))
        head = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        )
        tail = (
            f"\nQuestion: Find all variables that are assigned the value {value} in the text "
            f"above. Answer: According to the chain(s) of variable assignment in the text "
            f"above, 5 variables are assigned the value {value}, they are:"
        )
        prompt = _with_needles(rng, builder, length, head, needles, tail, depths)
        return _sample(task, builder, prompt, names, 30, None, tail)
    words = _words()
    if task == "common_words":  # ten words appear 30 times each, the rest once
        chosen = [
            words[i] for i in rng.choice(len(words), size=min(len(words), 4000), replace=False)
        ]
        common, rare = chosen[:10], chosen[10:]

        def words_for(n):
            repeats = min(30, max(2, n // 20))
            return common * repeats + rare[: max(0, n - 10 * repeats)]

        head = (
            "Below is a numbered list of words. In these words, some appear more often "
            "than others. Memorize the ones that appear most often.\n"
        )
        tail = (
            "\nQuestion: What are the 10 most common words in the above list? Answer: The "
            "top 10 words that appear most often in the list are:"
        )
        prompt = _listing(rng, builder, length, words_for, head, tail)
        return _sample(task, builder, prompt, common, 120, None, tail)
    # frequent_words: coded words with Zipf frequencies; the three most frequent asked for
    coded = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(400)]

    def words_for(n):
        weights = 1.0 / np.arange(1, len(coded) + 1) ** 2.0
        counts = np.maximum(1, np.round(weights / weights.sum() * n)).astype(int)
        return [w for w, c in zip(coded, counts) for _ in range(c)][:n]

    head = (
        "Read the following coded text and track the frequency of each coded word. Find "
        "the three most frequently appeared coded words.\n"
    )
    tail = (
        "\nQuestion: Do not provide any explanation. What are the three most frequently "
        "appeared words in the above coded text? Answer: According to the coded text "
        "above, the three most frequently appeared words are:"
    )
    prompt = _listing(rng, builder, length, words_for, head, tail)
    return _sample(task, builder, prompt, coded[:3], 40, None, tail)


def _sample(task, builder, prompt, answers, new_tokens, depth, tail) -> RulerSample:
    text = builder.tokenizer.decode(prompt)
    question = len(builder.ids(tail))  # the prompt ends with the tail's own tokens
    return RulerSample(task, prompt, list(answers), new_tokens, depth, text, question)


def score(output: str, answers: list[str]) -> float:
    """RULER's string match for its synthetic tasks: the share of ``answers`` found in
    ``output``, case-insensitively (1.0 when every one is there)."""
    if not answers:
        raise ValueError("answers: expected at least one")
    found = output.lower()
    return sum(answer.lower() in found for answer in answers) / len(answers)
