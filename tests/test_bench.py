"""The benchmark: policy specs, bound providers and their training data, the JSON schema, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tempo.scheduler.bounds import BoundProvider, BoundQuery
from tempo.scheduler.slo import SLOClass
from tempo.serving.bench.benchmark import BenchConfig, BenchOut, PolicySpec, parse_policies, run_bench
from tempo.serving.bounds.providers import (
    EmpiricalProvider,
    FixedProvider,
    OracleProvider,
    ProviderContext,
    conditional_ladder,
    make_provider,
    register_provider,
    training_workload,
)
from tempo.serving.workloads.builder import WorkloadSpec, build_workload
from tempo.serving.workloads.sources import azure_conv_trace_path

from tempo.cli import main
from tempo.errors import TempoError

# The JSON contract: top-level keys, and the keys every run carries (consumers rely on these).
TOP_KEYS = {"schema_version", "created_by", "config", "profile", "saturation_rps", "estimators", "runs", "summary",
            "environment"}
RUN_KEYS = {
    "policy", "policy_name", "estimator", "params", "rps", "requests", "arrivals", "window_s", "token_goodput",
    "request_goodput", "raw_throughput", "delivered_throughput", "per_class", "preemptions",
    "preemptions_recompute", "preemptions_swap", "engine_preemptions", "recomputed_tokens", "rejections",
    "demotions", "decision_time", "steps", "sim_end_s", "truncated", "wall_s", "policy_config",
}
CLASS_KEYS = {"units", "met", "attainment", "good_tokens", "delivered_tokens", "ttft_s", "tbt_s", "e2e_s"}
SUMMARY_KEYS = {"rps", "load_factor", "fcfs", "best_baseline", "best_baseline_goodput", "tempo", "oracle",
                "tempo_vs_fcfs", "tempo_vs_best_baseline", "tempo_vs_oracle", "throughput_vs_fcfs", "ablations"}


def test_policy_specs() -> None:
    spec = PolicySpec.parse("tempo:fixed@p=2+share=1")
    assert (spec.name, spec.estimator, spec.params) == ("tempo", "fixed", (("p", "2"), ("share", "1")))
    assert spec.label == "tempo:fixed@p=2+share=1"
    assert PolicySpec.parse("oracle").estimator == "oracle" and PolicySpec.parse("oracle").label == "oracle"
    assert PolicySpec.parse("fcfs").label == "fcfs"
    assert [s.label for s in parse_policies("fcfs, tempo ,tempo-sjf")] == ["fcfs", "tempo", "tempo-sjf"]
    for bad, message in [("nope", "unknown policy"), ("tempo:psychic", "unknown estimator"),
                         ("tempo@p", "key=value"), ("fcfs,fcfs", "twice"), ("", "no policy")]:
        with pytest.raises(TempoError, match=message):
            parse_policies(bad)


def test_conditional_ladder_is_the_tail_quantile() -> None:
    lengths = list(range(1, 1001))  # uniform 1..1000
    ladder = conditional_ladder(lengths, 0.9)
    assert ladder.initial == 900
    steps = dict(ladder.steps)
    assert set(steps) >= {0, 225, 450, 630, 900}
    assert steps[450] == 450 + int(np.ceil(0.9 * 550))  # q-quantile of L given L > 450
    assert all(b > k for k, b in ladder.steps)


def test_empirical_provider_falls_back_from_app_to_class_to_everything() -> None:
    rng = np.random.default_rng(0)
    data = [(SLOClass.LATENCY, "chat/A", int(x)) for x in rng.integers(1, 100, 200)]
    data += [(SLOClass.DEADLINE, "code/B", int(x)) for x in rng.integers(500, 1000, 200)]
    data += [(SLOClass.DEADLINE, "code/rare", 5)] * 3
    provider = EmpiricalProvider(quantile=0.9).fit(data)
    assert isinstance(provider, BoundProvider)
    ladders = provider.ladders([
        BoundQuery("a", 10, SLOClass.LATENCY, app="chat/A"),
        BoundQuery("b", 10, SLOClass.DEADLINE, app="code/rare"),  # too few samples: the class ladder
        BoundQuery("c", 10, SLOClass.COMPOUND, app="agent"),  # unseen class: everything, flagged
    ])
    assert ladders[0].initial < 100 and 900 <= ladders[1].initial <= 1000
    assert ladders[2].fallback and not ladders[0].fallback


def test_fixed_and_oracle_providers_and_the_registry() -> None:
    queries = [BoundQuery("x", 5, SLOClass.LATENCY), BoundQuery("y", 5, SLOClass.DEADLINE)]
    assert [lad.initial for lad in FixedProvider(300).ladders(queries)] == [300, 300]
    assert [lad.initial for lad in OracleProvider({"x": 7, "y": 9}).ladders(queries)] == [7, 9]
    with pytest.raises(ValueError, match="already registered"):
        register_provider("empirical", lambda ctx: FixedProvider(1))
    with pytest.raises(TempoError, match="true lengths"):
        make_provider("oracle", ProviderContext(training=[]))
    with pytest.raises(TempoError, match="unknown estimator"):
        make_provider("psychic", ProviderContext(training=[]))


def test_training_set_shares_no_prompt_with_the_benchmark() -> None:
    spec = WorkloadSpec(rps=2, duration_s=60, arrivals=str(azure_conv_trace_path()), seed=3)
    bench = build_workload(spec)
    training = training_workload(spec, bench, size=500)
    bench_prompts = {w.source for w in bench if w.slo_class is not SLOClass.COMPOUND}
    assert training and not bench_prompts & {w.source for w in training if w.slo_class is not SLOClass.COMPOUND}
    assert len(training) > 500


@pytest.fixture(scope="module")
def tiny_bench() -> BenchOut:
    config = BenchConfig(
        policies=parse_policies("fcfs,srtf,tempo,oracle,tempo:fixed,tempo-sjf"),
        rps=[1.5],
        duration_s=40.0,
        training_size=300,
    )
    return run_bench(config, saturation_rps=2.0)


def test_bench_json_schema(tiny_bench: BenchOut) -> None:
    raw = json.loads(tiny_bench.model_dump_json())
    assert set(raw) == TOP_KEYS and raw["schema_version"] == 1
    assert len(raw["runs"]) == 6 and len(raw["summary"]) == 1
    for run in raw["runs"]:
        assert set(run) == RUN_KEYS
        assert set(run["per_class"]) <= {"latency", "deadline", "compound", "best_effort"}
        for cls in run["per_class"].values():
            assert set(cls) == CLASS_KEYS and set(cls["ttft_s"]) == {"count", "p50", "p90", "p99"}
        assert set(run["decision_time"]) == {"decisions", "p50_ms", "p99_ms", "mean_ms", "max_ms"}
        assert run["token_goodput"] <= run["delivered_throughput"] + 1e-6
    summary = raw["summary"][0]
    assert set(summary) == SUMMARY_KEYS
    assert summary["load_factor"] == pytest.approx(0.75)
    assert summary["best_baseline"] in ("fcfs", "srtf")
    assert set(summary["ablations"]) == {"tempo:fixed", "tempo-sjf"}
    assert BenchOut.model_validate(raw) == tiny_bench


def test_bench_is_deterministic_and_uses_one_workload_for_every_policy(tiny_bench: BenchOut) -> None:
    assert len({(r.requests, r.arrivals) for r in tiny_bench.runs}) == 1
    again = run_bench(
        BenchConfig(policies=parse_policies("tempo"), rps=[1.5], duration_s=40.0, training_size=300),
        saturation_rps=2.0,
    )
    first = next(r for r in tiny_bench.runs if r.policy == "tempo")
    assert again.runs[0].token_goodput == first.token_goodput and again.runs[0].steps == first.steps


def test_cli_bench_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(["bench", "--rps", "1", "--duration", "30", "--policies", "fcfs,tempo", "--json", str(out),
                 "--plot", str(png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "token goodput" in printed and "vs FCFS" in printed
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["fcfs", "tempo"]
    assert png.stat().st_size > 1000


def test_cli_bench_replays_a_workload_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.jsonl"
    assert main(["workload", "build", "--rps", "1", "--duration", "30", "--seed", "4", "-o", str(path)]) == 0
    out = tmp_path / "r.json"
    assert main(["bench", "--workload", str(path), "--policies", "fcfs,tempo", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["workload"] == str(path) and len(data["runs"]) == 2


def test_cli_cost_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    assert main(["bench", "--cost", "--queued", "20", "--policies", "fcfs,tempo", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["policy"] for r in rows} == {"fcfs", "tempo"} and all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "fcfs,nope"], "unknown policy"),
        (["--rps", "fast"], "--rps"),
        (["--rps", "-2"], "--rps"),
        (["--engine", "vllm"], "--engine"),
        (["--profile", "tpu-v9"], "unknown engine profile"),
        (["--workload", "/no/such.jsonl"], "not found"),
    ],
)
def test_cli_bench_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "--duration", "10", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_default_saturation_constant_is_what_find_capacity_measures() -> None:
    """``tempo bench`` without --rps scales its rates by DEFAULT_SATURATION_RPS in the default setting
    instead of measuring it each time: the constant must stay what the measurement gives."""
    from tempo.serving.bench.benchmark import DEFAULT_SATURATION_RPS, find_capacity

    measured = find_capacity(BenchConfig(policies=[PolicySpec("fcfs")]))["saturation_rps"]
    assert measured == pytest.approx(DEFAULT_SATURATION_RPS, rel=0.02)
