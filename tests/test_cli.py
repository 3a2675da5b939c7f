import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from jaxgrm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("data", "sft", "rl", "distill", "score", "serve", "demo"):
        assert f"  {name} " in result.output


def test_demo_runs_end_to_end(capsys):
    from jaxgrm.demo import run_demo

    accuracy = run_demo(steps=15, num_samples=1)
    out = capsys.readouterr().out
    assert "tokenizer:" in out and "--- pair 0" in out and "grade accuracy" in out
    assert 0.0 <= accuracy <= 1.0


def test_ruff_is_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
