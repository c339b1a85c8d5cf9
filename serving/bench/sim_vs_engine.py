"""The simulator against the real engine on the same workload files: token goodput, per-class attainment and
E2E p50 / p90 per policy, simulated (``tempo bench --workload F --profile cpu-tiny-llama --charge-decisions``)
beside measured (``tempo bench --engine vllm --workload F``).

    python -m tempo.serving.bench.sim_vs_engine --sim SIM1.json[,SIM2.json] --engine ENG1.json[,ENG2.json] --json OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _sim_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for run in doc["runs"]:
        pc = run["per_class"]
        out[run["policy"]] = {"token_goodput": run["token_goodput"],
                              "attainment": {c: v["attainment"] for c, v in pc.items()},
                              "e2e_p50_s": {c: v["e2e_s"]["p50"] for c, v in pc.items()},
                              "e2e_p90_s": {c: v["e2e_s"]["p90"] for c, v in pc.items()}}
    return out


def _engine_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rate in doc["rates"]:
        for run in rate["runs"]:
            if run["policy"] in out:
                continue  # the first repeat (the medians are in the file too)
            pc = run["per_class"]
            out[run["policy"]] = {"token_goodput": run["token_goodput"],
                                  "attainment": {c: v["attainment"] for c, v in pc.items()},
                                  "e2e_p50_s": {c: v["e2e_p50_s"] for c, v in pc.items()},
                                  "e2e_p90_s": {c: v["e2e_p90_s"] for c, v in pc.items()}}
        for policy, median in rate["medians"].items():
            out[policy]["token_goodput"] = median["token_goodput"]
    return out


def compare(sim_files: list[Path], engine_files: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for sim_path, engine_path in zip(sim_files, engine_files, strict=True):
        sim, engine = _sim_rows(json.loads(sim_path.read_text())), _engine_rows(json.loads(engine_path.read_text()))
        for policy in engine:
            if policy not in sim:
                continue
            s, e = sim[policy], engine[policy]
            rows.append({"workload": engine_path.stem, "policy": policy, "simulated": s, "measured": e,
                         "token_goodput_sim_over_engine": s["token_goodput"] / e["token_goodput"]
                         if e["token_goodput"] else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = compare([Path(p) for p in args.sim.split(",")], [Path(p) for p in args.engine.split(",")])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows:
        s, e = row["simulated"], row["measured"]
        att = " ".join(f"{c[0].upper()} {s['attainment'].get(c) or 0:.2f}/{e['attainment'].get(c) or 0:.2f}"
                       for c in ("latency", "deadline", "compound"))
        print(f"{row['workload']:>24} {row['policy']:>8}: token goodput sim {s['token_goodput']:,.0f} / engine "
              f"{e['token_goodput']:,.0f} ({row['token_goodput_sim_over_engine']:.2f}x); attainment sim/engine {att}")


if __name__ == "__main__":
    main()
