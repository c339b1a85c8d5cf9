"""The tempo CLI: the workload contract, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tempo.serving.workloads.sources import azure_conv_trace_path

from tempo.cli import main

SUBCOMMANDS = ("workload", "estimator", "profile", "bench", "serve", "fuzz", "chaos", "soak", "demo")


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from tempo.cli import app

    assert set(typer.main.get_command(app).commands) == set(SUBCOMMANDS)  # type: ignore[attr-defined]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out[out.index("Commands"):]  # the app's description names some of them too: look at the table
    listed = {line.strip("│ ").split()[0] for line in commands.splitlines()[1:] if line.startswith("│ ")}
    assert set(SUBCOMMANDS) <= listed


def test_build_then_stats_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.jsonl"
    args = ["workload", "build", "--rps", "2", "--duration", "120", "--mix", "1:1:1:1",
            "--arrivals", str(azure_conv_trace_path()), "--seed", "7", "-o", str(out)]
    assert main(args) == 0
    assert main(["workload", "stats", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["arrivals"] == 240
    assert abs(summary["rate_rps"] / 2 - 1) < 0.05
    assert set(summary["mix"]) == {"latency", "deadline", "compound", "best_effort"}
    assert main(["workload", "stats", str(out)]) == 0
    assert "per class" in capsys.readouterr().out


BAD_INPUTS = [
    (["--mix", "latency=1,chat=2"], "unknown SLO class"),
    (["--mix", "0:0:0:0"], "sum to 0"),
    (["--arrivals", "/no/such/trace.csv"], "trace file not found"),
    (["--arrivals", "MALFORMED"], "malformed trace row"),
    (["--rps", "fast"], "Invalid value for '--rps'"),
    (["--rps", "-1"], "--rps must be > 0"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    malformed = tmp_path / "bad.csv"
    malformed.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,3,4\n2023-11-16 18:15:47,x\n")
    extra = [str(malformed) if e == "MALFORMED" else e for e in extra]
    code = main(["workload", "build", "--duration", "10", "-o", str(tmp_path / "w.jsonl"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_installed_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "tempo"
    result = subprocess.run([str(exe), "workload", "stats", str(tmp_path / "missing.jsonl")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tempo: error:") and len(result.stderr.strip().splitlines()) == 1


def test_eval_without_the_ml_extra_says_what_is_missing() -> None:
    code = ("import sys\n"
            "for name in ('sklearn', 'lightgbm', 'quantile_forest', 'river', 'skops'):\n"
            "    sys.modules[name] = None\n"
            "from tempo.cli import main\n"
            "sys.exit(main(['estimator', 'eval', '--json', 'x.json']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    assert "needs the 'ml' extra" in result.stderr and len(result.stderr.strip().splitlines()) == 1
