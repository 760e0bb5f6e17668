"""Train the tiny byte-level Llama LM that kvpack ships.

    python -m kvpack.eval.train_tiny_lm --out python/kvpack/models/tiny_lm

Deterministic for a seed and thread count on one machine (the data are the local
standard library and /usr/share/doc; see :mod:`kvpack.eval.tasks`). Training runs in
phases of growing context (length:batch:steps), each batch a mix of natural text,
pass-key prompts, key-value lookups and repeated random strings (which teach
looking back early), with bfloat16 autocast on the CPU. Every
``--eval-every`` steps it logs the held-out loss (bits per byte) and pass-key accuracy
at the phase's length, and writes the weights, so a run can be stopped early.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..models import TINY_LM_DIR, tiny_lm_config
from ..models.byte_tokenizer import BOS
from . import tasks


def _batch(rng, corpus, length, batch, mix, repeat_period=None, repeat_alphabet="letters"):
    rows = []
    for _ in range(batch):
        kind = rng.choice(4, p=mix)
        if kind == 0:
            start = int(rng.integers(0, corpus.train.size - length))
            rows.append([BOS, *corpus.train[start : start + length - 1].tolist()])
        elif kind == 1:
            text = corpus.train if rng.random() < 0.5 else None
            rows.append(tasks.passkey_sample(rng, length, text)[0])
        elif kind == 2:
            rows.append(tasks.kv_lookup_sample(rng, length))
        else:
            rows.append(tasks.repeat_sample(rng, length, repeat_period, repeat_alphabet))
    return np.asarray(rows, dtype=np.int64)


def evaluate(model, corpus, length, rng, prompts=16, windows=8):
    """Held-out bits per byte, and pass-key accuracy (teacher-forced greedy match)."""
    import torch

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        starts = rng.integers(0, corpus.held_out.size - length, size=windows)
        ids = torch.tensor(
            np.stack([[BOS, *corpus.held_out[s : s + length - 1]] for s in starts]),
            dtype=torch.long,
        )
        loss = float(model(input_ids=ids, labels=ids).loss)
        correct = 0
        for i in range(prompts):
            text = corpus.held_out if i % 2 else None
            sample, answer_start, _ = tasks.passkey_sample(rng, length, text)
            logits = model(input_ids=torch.tensor([sample])).logits[0]
            predicted = logits[answer_start - 1 : -1].argmax(-1).tolist()
            correct += predicted == sample[answer_start:]
    model.train()
    return loss / math.log(2), correct / prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TINY_LM_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--phases",
        default="256:32:400,512:16:700,1024:8:400,2048:4:600",
        help="length:batch:steps per phase",
    )
    parser.add_argument(
        "--mix", default="0.3,0.2,0.2,0.3", help="text, pass-key, lookup, repeat shares"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--stop-after", type=int, help="stop after this step (the schedule still spans all phases)"
    )
    parser.add_argument(
        "--repeat-period", type=int, help="longest period of the repeated strings [length / 2]"
    )
    parser.add_argument(
        "--repeat-alphabet",
        choices=sorted(tasks.REPEAT_ALPHABETS),
        default="letters",
        help="symbols of the repeated strings",
    )
    parser.add_argument(
        "--init", type=Path, help="continue from the weights in this directory (a later stage)"
    )
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1)
    phases = [tuple(int(x) for x in p.split(":")) for p in args.phases.split(",")]
    mix = np.array([float(x) for x in args.mix.split(",")])
    mix /= mix.sum()
    context = max(length for length, _, _ in phases)
    total = sum(steps for _, _, steps in phases)

    corpus = tasks.corpus()
    if args.init:
        model = LlamaForCausalLM.from_pretrained(
            args.init, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.config.max_position_embeddings = max(context, model.config.max_position_embeddings)
        earlier = json.loads((args.init / "training.json").read_text())
    else:
        model = LlamaForCausalLM._from_config(tiny_lm_config(context), attn_implementation="sdpa")
        earlier = None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "architecture": tiny_lm_config(context).to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "sources": corpus.sources,
            "files": corpus.files,
            "train_bytes": int(corpus.train.size),
            "held_out_bytes": int(corpus.held_out.size),
        },
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "log": [],
    }
    if earlier:
        # Flat: each earlier stage once, in order, without its own copy of the ones before.
        stage = {k: v for k, v in earlier.items() if k != "earlier_stages"}
        record["earlier_stages"] = [*earlier.get("earlier_stages", []), stage]
        record["architecture"] = model.config.to_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    model.train()
    step, started = 0, time.time()
    for length, batch, steps in phases:
        for _ in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            ids = torch.from_numpy(
                _batch(rng, corpus, length, batch, mix, args.repeat_period, args.repeat_alphabet)
            )
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0:
                print(
                    f"step {step}/{total} len {length} loss {loss.item():.3f} "
                    f"{time.time() - started:.0f}s",
                    flush=True,
                )
            last = step == total or step == args.stop_after
            if step % args.eval_every == 0 or last:
                bits, passkey = evaluate(model, corpus, length, eval_rng)
                entry = {
                    "step": step,
                    "length": length,
                    "train_loss": loss.item(),
                    "held_out_bits_per_byte": bits,
                    "passkey": passkey,
                    "seconds": time.time() - started,
                }
                record["log"].append(entry)
                print(json.dumps(entry), flush=True)
                copy.deepcopy(model).to(torch.float16).save_pretrained(args.out)
                (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
            if step == args.stop_after:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
