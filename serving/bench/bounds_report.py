"""How good each bound provider's bounds are on a benchmark workload, per class: coverage, reserved tokens per
used token, and how well the bound ranks requests by their true length (Kendall's tau). Answers why a
better-ranking learned bound does not raise the simulated goodput by itself (docs/serving.md).

    python -m tempo.serving.bench.bounds_report --rps 4.54 --prompt-split test --json OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau
from tempo.scheduler.slo import SLOClass
from tempo.serving.bench.benchmark import BenchConfig, PolicySpec, ladders_for, setup_rate


def bounds_report(rps: float, prompt_split: str | None, estimators: list[str], seed: int = 0,
                  duration_s: float = 600.0, quantile: float = 0.9) -> dict[str, Any]:
    setup = setup_rate(BenchConfig(policies=[PolicySpec("tempo")], prompt_split=prompt_split, seed=seed,
                                   duration_s=duration_s, quantile=quantile), rps)
    out: dict[str, Any] = {"rps": rps, "prompt_split": prompt_split, "quantile": quantile, "estimators": {}}
    for estimator in estimators:
        ladders = ladders_for(setup, estimator, quantile)
        rows = {}
        for cls in (SLOClass.LATENCY, SLOClass.DEADLINE, SLOClass.COMPOUND):
            ws = [w for w in setup.workload if w.slo_class is cls]
            if not ws:
                continue
            bound = np.array([ladders[w.id].initial for w in ws], dtype=float)
            true = np.array([w.output_tokens for w in ws], dtype=float)
            tau = kendalltau(bound, true).statistic if np.ptp(bound) > 0 else None
            rows[cls.value] = {"requests": len(ws), "coverage": float(np.mean(true <= bound)),
                               "reserved_per_used": float(bound.sum() / true.sum()),
                               "kendall_tau": None if tau is None or np.isnan(tau) else float(tau)}
        out["estimators"][estimator] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=4.54)
    parser.add_argument("--prompt-split", default="test")
    parser.add_argument("--estimators", default="empirical,learned,fixed")
    parser.add_argument("--quantile", type=float, default=0.9)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    report = bounds_report(args.rps, args.prompt_split, args.estimators.split(","), quantile=args.quantile)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    for name, rows in report["estimators"].items():
        print(name, {c: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for c, r in rows.items()})


if __name__ == "__main__":
    main()
