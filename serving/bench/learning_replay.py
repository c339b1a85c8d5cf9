"""A recorded learning loop replayed offline (``tempo estimator replay-loop``): is its coverage the learner's
doing or the luck of one order?

``tempo bench --engine vllm --learning-loop`` records, per completion, the served bound and the answer's
length. The rolling coverage it reports is one path: 600 completions in one order, with windows of 100,
where the binomial noise of a window alone (sd 0.03 at q = 0.9) is as large as the 0.03 the coverage is
asked to stay within. This replays the same completions through the estimator's own code (``Estimator``:
the batch model, the River model, the adaptive calibrators) without an engine, in the recorded order (each
bound served when its request was sent, from the completions back by then) and in random orders (each
bound ``lag`` completions behind: the loop's concurrency);
and it draws the same windows from an ideal bound (covered independently with probability q). The
recorded order is also replayed with the loop's mid-run retrain (a batch model fitted on the completions so
far, swapped in at once) and scored with the fallback bounds the loop served under load kept as served.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from tempo.serving.bench.learning_loop import loop_prompts, rolling, within_target

from tempo.errors import TempoError

TRUE_LENGTHS = ("stop", "length")


def load_loop(path: Path) -> dict[str, Any]:
    """A ``--learning-loop`` JSON with its records checked: each has a ``loop-<i>`` id, a length, a bound."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TempoError(f"{path}: not a readable JSON file ({exc})") from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not records:
        raise TempoError(f"{path}: no 'records' list (write one with tempo bench --engine vllm --learning-loop)")
    for n, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("output_tokens"), int) and "request_id" in r
              and prompt_index(str(r["request_id"])) is not None)
        if not ok:
            raise TempoError(f"{path}: record {n} is not a learning-loop completion (request_id 'loop-<i>', "
                             "output_tokens, bound)")
    return data


def prompt_index(request_id: str) -> int | None:
    """The prompt a loop request carried: its id holds ``loop-<i>`` (the i-th of ``loop_prompts``)."""
    parts = request_id.split("-")
    for a, b in pairwise(parts):
        if a == "loop" and b.isdigit():
            return int(b)
    return None


def retrained(records: Sequence[dict[str, Any]], quantile: float) -> Any:
    """The batch model ``tempo estimator retrain`` fits on these completion records (no gate: the loop's was
    activated), as the estimator serves it."""
    from tempo.estimator.engine import ServedModel
    from tempo.estimator.retrain import samples_from_records
    from tempo.models.features import FeatureSpec
    from tempo.models.length_bounds import LengthBoundModel

    parts = samples_from_records(list(records), FeatureSpec())
    model = LengthBoundModel(quantile=quantile).fit(parts["fit"]).calibrate(parts["calibration"], groups_by_app=True)
    return ServedModel(f"retrained-{len(records)}", model, "", frozenset(model.spec.apps),
                       frozenset(model.spec.models))


def served_after_lag(n: int, lag: int) -> list[int]:
    """Completions learned when each of ``n`` requests was served, had request k been sent as completion
    k - lag - 1 came back (a random order carries no submission order of its own)."""
    return [max(0, k - lag) for k in range(n)]


def served_after_submission(records: Sequence[dict[str, Any]], concurrency: int) -> list[int]:
    """Completions learned when each recorded request was served. The loop sends prompt i (its id's
    ``loop-<i>``) when the (i - concurrency + 1)-th answer comes back, and records answers in completion
    order, so a long answer's bound was served well before its place in the records (the lag alone would
    serve it later, from a calibrator that has learned more)."""
    out = []
    for k, record in enumerate(records):
        i = prompt_index(str(record["request_id"]))
        out.append(min(k, max(0, (i if i is not None else k) - concurrency + 1)))
    return out


def replay_bounds(records: Sequence[dict[str, Any]], prompts: Sequence[tuple[str, str, str]], served: Any,
                  served_after: Sequence[int], served_model: str, max_tokens: int, quantile: float = 0.9,
                  learner: Any = None, retrain_at: int | None = None, on_swap: str = "recalibrate",
                  learn_with: str = "served") -> list[int]:
    """The bound the estimator would serve each record's request, learning from the records in the given
    order; request k is served once the first ``served_after[k]`` of them have been learned, each with the
    prompt lengths the engine recorded. ``retrain_at``: once that many are learned, a batch model retrained
    on them is swapped in; ``on_swap``: its calibrators learned from the recent completions as the service
    does (``recalibrate``), the old model's ``kept``, or started ``afresh`` (the service before stop 23).
    ``learn_with``: the prompt length learned with, the one the bound was asked for (``served``: the service
    since stop 24) or the engine's count (``engine``: before)."""
    from tempo.estimator.engine import Estimator
    from tempo.estimator.schemas import EstimateRequest
    from tempo.models.features import FeatureSpec, PromptSketch, pack_sketch
    from tempo.scheduler.bounds import prompt_tokens_of_text

    estimator = Estimator(quantile, learner=learner)
    estimator.swap(served)

    def fields(r: dict[str, Any]) -> dict[str, Any]:
        cls, app, text = prompts[prompt_index(str(r["request_id"])) or 0]
        return {"prompt": text, "app": r.get("app") or app, "model": served_model,
                "slo_class": r.get("slo_class") or cls}

    spec = FeatureSpec()
    learned: list[dict[str, Any]] = []

    def learn(done: dict[str, Any]) -> None:
        f = fields(done)
        # the prompt lengths the engine recorded (files before stop 24 have neither: the text's guess)
        lengths = {key: done[key] for key in ("prompt_tokens", "estimate_prompt_tokens") if key in done}
        if learn_with == "engine":
            lengths.pop("estimate_prompt_tokens", None)
        learned.append({**{key: v for key, v in f.items() if key != "prompt"},
                        "sketch": pack_sketch(PromptSketch.of(f["prompt"], spec), spec),
                        "prompt_tokens": prompt_tokens_of_text(f["prompt"]), **lengths,
                        "output_tokens": done["output_tokens"], "finish_reason": done.get("finish_reason")})
        estimator.apply(learned[-1:])
        if len(learned) == retrain_at:
            new = retrained(learned, quantile)
            if on_swap == "recalibrate":
                estimator.swap(new)
            else:
                estimator.served = new
                if on_swap == "afresh":
                    estimator.learner.reset_source("batch")

    bounds = [0] * len(records)
    for k in sorted(range(len(records)), key=lambda k: served_after[k]):
        while len(learned) < served_after[k]:
            learn(records[len(learned)])
        f = fields(records[k])
        request = EstimateRequest(prompt=f["prompt"], slo_class=f["slo_class"], app=f["app"], model=served_model,
                                  max_tokens=max_tokens)
        bounds[k] = estimator.estimate([request])[0].upper_bound
    return bounds


def window_stats(records: Sequence[dict[str, Any]], window: int, quantile: float, after: int) -> dict[str, Any]:
    """Rolling coverage in windows of ``window`` completions: from where it stays within 0.03 of q, and the
    windows ending at or after ``after``: the share within 0.03 and their mean coverage."""
    roll = rolling(list(records), window, quantile)
    late = [p["coverage"] for p in roll["points"] if p["completions"] >= after]
    return {"within_0.03_from": roll["within_0.03_from"],
            "late_share_within_0.03": sum(within_target(c, quantile) for c in late) / len(late) if late else None,
            "late_mean_coverage": statistics.fmean(late) if late else None}


def ideal_windows(n: int, window: int, quantile: float, after: int, trials: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """The same windows for an ideal bound: each of ``n`` completions covered independently with probability
    q. How often every window from ``after`` on is within 0.03 of q, and the share of such windows that is."""
    rng = random.Random(seed)
    every, shares = 0, []
    for _ in range(trials):
        covered = [rng.random() < quantile for _ in range(n)]
        sums = [0]
        for c in covered:
            sums.append(sums[-1] + c)
        late = [(sums[e] - sums[e - window]) / window for e in range(window, n + 1, max(1, window // 5)) if e >= after]
        within = [within_target(c, quantile) for c in late]
        every += all(within)
        shares.append(sum(within) / len(within) if within else 0.0)
    return {"p_every_window_within_0.03": every / trials, "late_share_within_0.03": statistics.fmean(shares)}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize_orders(stats: Sequence[dict[str, Any]], after: int) -> dict[str, Any]:
    froms = [s["within_0.03_from"] for s in stats]
    return {"orders": len(stats),
            f"within_0.03_by_{after}": sum(f is not None and f <= after for f in froms),
            "within_0.03_from": froms,
            "late_share_within_0.03": _mean([s["late_share_within_0.03"] for s in stats]),
            "late_mean_coverage": _mean([s["late_mean_coverage"] for s in stats])}


def replay_loop(path: Path, orders: int = 12, windows: Sequence[int] = (100, 200, 300), after: int = 300,
                served_model: str = "SmolLM2-135M-Instruct", artifact: Path | None = None, seed: int = 0,
                on_progress: Any = None) -> dict[str, Any]:
    """The recorded loop's coverage, its replay in the recorded order and in ``orders`` random orders, and an
    ideal bound's, for each window size."""
    from tempo.estimator.engine import ServedModel
    from tempo.serving.vllm.stack import bootstrap_artifact

    data = load_loop(path)
    records = [r for r in data["records"] if r.get("finish_reason") in TRUE_LENGTHS]
    quantile = float(data.get("quantile", 0.9))
    concurrency = int(data.get("concurrency", 16))
    lag = max(0, concurrency - 1)
    max_tokens = int(data.get("max_tokens", 512))
    prompts = loop_prompts(max(prompt_index(str(r["request_id"])) or 0 for r in records) + 1)
    served = ServedModel.load(artifact or bootstrap_artifact())
    rng = random.Random(seed)
    paths = {"recorded order": records}
    for k in range(orders):
        shuffled = records[:]
        rng.shuffle(shuffled)
        paths[f"order {k + 1}"] = shuffled
    replayed: dict[str, list[dict[str, Any]]] = {}
    at_submission = served_after_submission(records, concurrency)
    for n, (name, order) in enumerate(paths.items()):
        after_learned = at_submission if order is records else served_after_lag(len(order), lag)
        bounds = replay_bounds(order, prompts, served, after_learned, served_model, max_tokens, quantile)
        replayed[name] = [{**r, "bound": b} for r, b in zip(order, bounds, strict=True)]
        if on_progress is not None:
            on_progress((n + 1) / len(paths))
    out: dict[str, Any] = {"source": str(path), "completions": len(records), "quantile": quantile, "lag": lag,
                           "max_tokens": max_tokens, "after": after, "windows": {}}
    def fallbacks_kept(replay: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r if r.get("bound_fallback") and r.get("bound") else p for r, p in zip(records, replay, strict=True)]

    # the recorded order again: with the bounds the live loop took from its local fallback kept as served,
    # and with its retrain (if one was activated), each way a swapped-in model's calibrators can start
    with_fallbacks = fallbacks_kept(replayed["recorded order"])
    at_lag = replay_bounds(records, prompts, served, served_after_lag(len(records), lag), served_model, max_tokens,
                           quantile)  # each bound served at its place in the records (the replay before stop 24)
    out["fallbacks"] = sum(bool(r.get("bound_fallback")) for r in records)
    retrain = data.get("retrain") or {}
    out["retrain_at"] = retrain_at = (int(retrain["started_at"]) if (retrain.get("report") or {}).get("status")
                                      == "activated" else None)
    with_retrain = {}
    if retrain_at is not None:
        for name, on_swap in (("replayed_recorded_order_with_its_retrain", "recalibrate"),
                              ("replayed_recorded_order_with_its_retrain_calibrators_kept", "kept"),
                              ("replayed_recorded_order_with_its_retrain_calibrators_afresh", "afresh")):
            bounds = replay_bounds(records, prompts, served, at_submission, served_model, max_tokens, quantile,
                                   retrain_at=retrain_at, on_swap=on_swap)
            with_retrain[name] = [{**r, "bound": b} for r, b in zip(records, bounds, strict=True)]
        if any("estimate_prompt_tokens" in r for r in records):  # the service before stop 24, on this path
            bounds = replay_bounds(records, prompts, served, at_submission, served_model, max_tokens, quantile,
                                   retrain_at=retrain_at, learn_with="engine")
            with_retrain["replayed_recorded_order_with_its_retrain_learning_engine_prompt_tokens"] = [
                {**r, "bound": b} for r, b in zip(records, bounds, strict=True)]
        # what the engine ran: the retrain, and the fallback bounds it served while the service was slow
        with_retrain["replayed_recorded_order_with_its_retrain_and_fallbacks"] = fallbacks_kept(
            with_retrain["replayed_recorded_order_with_its_retrain"])
    for window in windows:
        out["windows"][str(window)] = {
            "recorded": window_stats(records, window, quantile, after),
            "replayed_recorded_order": window_stats(replayed["recorded order"], window, quantile, after),
            "replayed_recorded_order_with_its_fallbacks": window_stats(with_fallbacks, window, quantile, after),
            "replayed_recorded_order_served_at_lag": window_stats(
                [{**r, "bound": b} for r, b in zip(records, at_lag, strict=True)], window, quantile, after),
            **{name: window_stats(v, window, quantile, after) for name, v in with_retrain.items()},
            "replayed_random_orders": summarize_orders(
                [window_stats(v, window, quantile, after) for k, v in replayed.items() if k != "recorded order"],
                after),
            "ideal_bound": ideal_windows(len(records), window, quantile, after, seed=seed),
        }
    return out
