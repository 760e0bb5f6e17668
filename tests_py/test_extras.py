"""Without the optional extras: every entry point that needs one says which, in one line,
before it loads or writes anything."""

import subprocess
import sys
import textwrap

import pytest

EXTRAS = ("torch", "transformers", "safetensors", "matplotlib")


def without(modules, code):
    """Runs ``code`` in a fresh interpreter where ``modules`` cannot be imported (as in an
    install without the extras: ``find_spec`` finds nothing, ``import`` fails)."""
    blocker = f"import sys\nfor name in {tuple(modules)!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli(modules, *argv):
    return without(modules, f"from kvpack.cli import main\nsys.exit(main({list(argv)!r}))")


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_demo_names_the_extra_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    run = cli(EXTRAS, "demo", "--out", str(out))
    assert run.returncode == 1
    line = one_line(run.stderr)
    assert line.startswith("kvpack demo: kvpack demo needs torch, transformers, safetensors")
    assert line.endswith("pip install 'kvpack[models]'")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, needs",
    [
        (("--model", "tiny"), "torch, transformers, safetensors"),
        (("--model", "minilm", "--task", "fidelity"), "torch, transformers,"),
        (("--model", "synthetic", "--task", "fidelity", "--plot", "figs"), "matplotlib,"),
    ],
)
def test_eval_names_the_extra(argv, needs):
    run = cli(EXTRAS, "eval", *argv)
    assert run.returncode == 1
    line = one_line(run.stderr)
    assert f"needs {needs}" in line and "pip install 'kvpack[models]'" in line


def test_eval_of_synthetic_keys_needs_no_extra():
    run = cli(
        EXTRAS,
        "eval",
        "--model",
        "synthetic",
        "--task",
        "fidelity",
        "--methods",
        "quest",
        "--budgets",
        "0.25",
        "--context",
        "512",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr
    assert "attention-output relative error" in run.stdout


def test_library_entry_points_name_the_extra():
    run = without(
        ("torch",),
        """
        import kvpack  # the core needs NumPy alone
        from kvpack._extras import MissingExtra
        from kvpack.eval import data
        from kvpack.models import load_pretrained, load_tiny_lm
        for call in (lambda: __import__("kvpack.hf"), load_tiny_lm, data.minilm_kv,
                     lambda: data.checkpoint_kv("x"),
                     lambda: load_pretrained("smollm2-135m")):
            try:
                call()
            except MissingExtra as error:
                print(error)
        """,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(" needs ")[0] for line in lines] == [
        "kvpack.hf",
        "load_tiny_lm",
        "minilm_kv",
        "checkpoint_kv",
        "load_pretrained",
    ]
    assert all(line.endswith("pip install 'kvpack[models]'") for line in lines)
