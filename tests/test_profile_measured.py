"""The CPU engine profile: step shapes are recorded as the simulator counts them, the fit recovers a known
profile from its own step times, and the shipped profile re-fits identically from its measurement file."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tempo.serving.profiles.cli import MEASURED_PROFILES, shipped_profiles
from tempo.serving.profiles.fit_measured import architecture, fit_measured_profile, power_knots
from tempo.serving.profiles.profile import PROFILES_DIR, EngineConfig, Hardware, Profile, load_profile
from tempo.serving.vllm.measure import MEASURED_FIELDS, StepShape, shape_of_step

from tempo.cli import main
from tempo.errors import TempoError

TINY_CONFIG = {
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
    "intermediate_size": 704, "vocab_size": 4102,
}
ENGINE = {"block_size": 128, "kv_blocks": 8192, "token_budget": 2048, "max_running": 256, "kv_cache_gib": 4,
          "dtype": "float32"}


def test_step_shapes_count_what_the_simulator_counts() -> None:
    # (computed before, scheduled now, tokens the request holds)
    shape = shape_of_step([(0, 100, 300), (200, 100, 300), (40, 1, 41), (7, 1, 8)])
    assert shape == StepShape(
        prefill_tokens=200, prefill_chunks=2, decode_seqs=2, decode_kv_tokens=41 + 8,
        prefill_pairs=100 * (0 + 50.5) + 100 * (200 + 50.5), prefill_ctx_tokens=100 + 300, sampled=3,
    )
    assert shape_of_step([(0, 1, 1)]).prefill_tokens == 1  # a one-token prompt is a prefill, and samples
    assert shape_of_step([(0, 1, 1)]).sampled == 1


def synthetic_measurements(truth: Profile, noise: float, seed: int = 0) -> dict[str, Any]:
    """Steps of the measurement plan's kinds, timed by ``truth`` with multiplicative noise, three repeats."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, list[StepShape]] = {}
    for p in (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048):
        shapes[f"prefill {p}"] = [shape_of_step([(0, p, p)])]
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        for ctx in (32, 512, 2000):
            steps = [shape_of_step([(ctx + i, 1, ctx + i + 1)] * b) for i in range(4)]
            mixed = shape_of_step([(ctx, 1, ctx + 1)] * (b // 2) + [(0, min(ctx, 2048 - b), ctx)])
            shapes[f"decode {b}x{ctx}"] = [*steps, mixed]
    rows = []
    for repeat in range(3):
        for name, steps in shapes.items():
            for i, s in enumerate(steps):
                t = truth.step_time(s.prefill_tokens, s.decode_seqs, s.decode_kv_tokens, s.prefill_pairs,
                                    s.prefill_ctx_tokens, s.sampled)
                t *= 1 + noise * rng.standard_normal()
                rows.append({"workload": name, "repeat": repeat, "step": i,
                             **{k: getattr(s, k) for k in MEASURED_FIELDS}, "seconds": t})
    return {"machine": {"cpu": "test"}, "engine": ENGINE, "model": TINY_CONFIG, "rows": rows}


def known_profile() -> Profile:
    knots = power_knots(2048)
    return Profile(
        name="truth",
        description="",
        arch=architecture(TINY_CONFIG, dtype_bytes=4),
        hw=Hardware("cpu", 4e9, mem_bw_Bps=3e9, gemm_flops=40e9, nvlink_Bps=0, allreduce_latency_s=0, pcie_Bps=3e9),
        engine=EngineConfig(block_size=128, kv_blocks=8192, swap_blocks=0, token_budget=2048, max_running=256),
        knots=tuple(knots),
        linear_s=tuple(0.003 + 6e-5 * k for k in knots),
        fit={},
        per_sampled_s=2e-5,
    )


def test_the_fit_recovers_a_known_profile() -> None:
    truth = known_profile()
    fitted = fit_measured_profile(synthetic_measurements(truth, noise=0.02), "x", "test")
    assert fitted.hw.mem_bw_Bps == pytest.approx(3e9, rel=0.15)
    assert fitted.hw.gemm_flops == pytest.approx(40e9, rel=0.15)
    assert fitted.per_sampled_s == pytest.approx(2e-5, rel=0.3)
    assert fitted.fit["held_back_mape_pct"] < 3.0  # ~the noise, on workloads the fit never saw
    assert set(fitted.fit["held_back_by_kind"]) == {"decode", "prefill", "mixed"}


def test_malformed_measurements_are_refused() -> None:
    raw = synthetic_measurements(known_profile(), 0.0)
    with pytest.raises(TempoError, match="too few measured steps"):
        fit_measured_profile({**raw, "rows": raw["rows"][:5]}, "x", "test")
    with pytest.raises(TempoError, match="malformed measurement file"):
        fit_measured_profile({**raw, "rows": [{"workload": "a"}]}, "x", "test")
    with pytest.raises(TempoError, match="model config lacks"):
        fit_measured_profile({**raw, "model": {}}, "x", "test")


def test_the_shipped_cpu_profile_reproduces_from_its_measurements() -> None:
    assert MEASURED_PROFILES["cpu-tiny-llama"].is_file()
    refit = next(p for p in shipped_profiles() if p.name == "cpu-tiny-llama").to_dict()
    assert refit == json.loads((PROFILES_DIR / "cpu-tiny-llama.json").read_text())


def test_profile_cli_checks_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "fit", "--check"]) == 0  # every shipped profile is what its generator writes
    assert "cpu-tiny-llama         held-back MAPE" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    assert main(["profile", "fit", "--measured", str(bad)]) == 2
    assert "expected a measurement object" in capsys.readouterr().err
    if find_spec("vllm") is None:
        assert main(["profile", "measure-vllm", "--out", str(tmp_path / "m.json")]) == 2
        assert "make vllm" in capsys.readouterr().err


def test_the_cpu_profile_is_accurate_on_held_back_workloads() -> None:
    p = load_profile("cpu-tiny-llama")
    fit = p.fit
    assert fit["held_back_rows"] > 50 and fit["fit_rows"] > 3 * fit["held_back_rows"]
    assert fit["held_back_mape_pct"] < 10.0
    assert p.engine.swap_blocks == 0 and p.per_sampled_s >= 0
    one = p.step_time(0, 1, 100)
    assert 0.001 < one < 0.02  # one decode of a 4-layer toy model on two cores: milliseconds
    assert p.step_time(0, 64, 64 * 2000) > p.step_time(0, 64, 64 * 100) > one
    assert p.prefill_time(4000) > 2 * p.prefill_time(1000)  # causal attention: more than linear


@pytest.mark.vllm
def test_measuring_the_real_engine_accounts_for_every_token(tmp_path: Path) -> None:
    """With the 'vllm' extra (``make vllm``): the recorded steps hold exactly the workloads' tokens."""
    pytest.importorskip("vllm")
    from tempo.serving.checkpoints.tiny_llama import TinyLlamaRecipe, ensure_tiny_llama
    from tempo.serving.vllm.measure import MeasureConfig, measure

    model = ensure_tiny_llama(tmp_path / "tiny", TinyLlamaRecipe(num_hidden_layers=1, tokenizer_prompts=300))
    cfg = MeasureConfig(repeats=1, kv_cache_gib=1, prefill_lengths=(40, 2500), decode_batches=(3,),
                        decode_contexts=(100,), decode_outputs=5)
    result = measure(model, cfg)
    steps = result["rows"]
    assert all(r["seconds"] > 0 for r in steps)
    assert result["engine"]["token_budget"] == 2048 and result["model"]["num_hidden_layers"] == 1
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for r in steps:
        by_workload.setdefault(r["workload"], []).append(r)
    for work in cfg.plan():
        rows = by_workload[work.name]
        assert sum(r["prefill_tokens"] for r in rows) == work.seqs * work.prompt_tokens
        assert sum(r["decode_seqs"] for r in rows) == work.seqs * (work.output_tokens - 1)
        assert sum(r["sampled"] for r in rows) == work.seqs * work.output_tokens
        assert max(r["prefill_tokens"] + r["decode_seqs"] for r in rows) <= 2048


@pytest.mark.vllm
def test_the_tiny_model_cache_is_reused_and_rebuilt_when_altered(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tempo.serving.checkpoints.tiny_llama import STAMP, TinyLlamaRecipe, ensure_tiny_llama

    recipe = TinyLlamaRecipe(num_hidden_layers=1, tokenizer_prompts=200)
    folder = ensure_tiny_llama(tmp_path / "tiny", recipe)
    weights = folder / "model.safetensors"
    stamp = json.loads((folder / STAMP).read_text())
    assert set(stamp["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    built = weights.stat().st_mtime_ns
    assert ensure_tiny_llama(tmp_path / "tiny", recipe) == folder and weights.stat().st_mtime_ns == built
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"\0" * 8)  # altered after the build
    ensure_tiny_llama(tmp_path / "tiny", recipe)
    assert weights.read_bytes() == original  # rebuilt: same seed, same bytes
