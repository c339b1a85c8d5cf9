"""``tempo estimator ...``: serve, retrain, train, loadtest, worker, publish, rollback, replay-loop (and ``eval``,
``eval-graphs`` from models/).

User errors (bad options, unreachable Redis, bad artifacts) raise TempoError: one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from tempo.errors import TempoError

estimator_app = typer.Typer(name="estimator", help="Length estimator service: serve, retrain, loadtest.",
                            no_args_is_help=True, add_completion=False)

RedisUrl = Annotated[str | None, typer.Option("--redis-url", help="Redis URL (default: TEMPO_REDIS_URL).")]
Artifacts = Annotated[Path | None, typer.Option("--artifacts", help="Artifacts directory (TEMPO_ARTIFACTS_DIR).")]


def _settings(redis_url: str | None, artifacts: Path | None, **extra: Any) -> Any:
    from pydantic import ValidationError
    from tempo.estimator.settings import Settings

    values: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if redis_url is not None:
        values["redis_url"] = redis_url
    if artifacts is not None:
        values["artifacts_dir"] = artifacts
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise TempoError(f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def _store(settings: Any) -> Any:
    from tempo.estimator.store import Store

    store = Store(settings.redis_url, settings.key_prefix, settings.stream, max(settings.redis_timeout_s, 2.0))
    if not store.ping():
        raise TempoError(f"cannot reach Redis at {settings.redis_url}")
    return store


@estimator_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8100,
    redis_url: RedisUrl = None,
    artifacts: Artifacts = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the REST API (with the online learner and the registry watcher in the background)."""
    import uvicorn
    from tempo.estimator.app import create_app

    settings = _settings(redis_url, artifacts)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)


@estimator_app.command("retrain")
def retrain(
    since: Annotated[str | None, typer.Option(help="First stream id (ms[-seq]) of the training window.")] = None,
    min_samples: Annotated[int, typer.Option("--min-samples", help="Skip when fewer completions.", min=10)] = 1000,
    every: Annotated[float | None, typer.Option(help="Periodic mode: retrain every this many seconds.")] = None,
    n_estimators: Annotated[int | None, typer.Option(help="Boosting rounds (default: the model's).")] = None,
    redis_url: RedisUrl = None,
    artifacts: Artifacts = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Train on completions from Redis; publish and activate only when not worse than the active model."""
    from tempo.estimator.retrain import periodic
    from tempo.estimator.retrain import retrain as run_retrain

    if since is not None and not all(p.isdigit() for p in since.split("-", 1)):
        raise TempoError(f"--since must be a stream id like 1700000000000 or 1700000000000-0, got {since!r}")
    settings = _settings(redis_url, artifacts)
    store = _store(settings)
    params = {"n_estimators": n_estimators} if n_estimators else None
    if every is not None:
        if every <= 0:
            raise TempoError("--every must be positive")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        with contextlib.suppress(KeyboardInterrupt):
            periodic(store, settings, every, min_samples, params, stop)
        return
    report = run_retrain(store, settings, since=since, min_samples=min_samples, model_params=params)
    text = json.dumps(report.to_dict(), indent=2)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
    typer.echo(text)


TRAIN_HELP = (
    "Train a model artifact from a CASTILLO-format dataset and measure it on held-back prompts.\n\n"
    "Rows are split by prompt hash 60/20/20 into fit / calibration / held-back test (prompts disjoint); the "
    "held-back coverage and reserved tokens per used token go into the manifest. "
    "Serve it with `tempo estimator publish OUT`."
)


@estimator_app.command("train", help=TRAIN_HELP)
def train(
    data: Annotated[Path, typer.Option(
        help="Lengths file in the CASTILLO format: CSV or JSONL (optionally .gz) with dataset, model, prompt_id, "
             "input_tokens and out0..out9 (JSONL: or an 'outputs' list). E.g. "
             "data/castillo/castillo_lengths.csv.gz.")],
    prompts: Annotated[Path, typer.Option(
        help="Prompts file: JSONL(.gz) with prompt_id and prompt_text for the lengths file's prompt ids. E.g. "
             "data/castillo/castillo_prompts.jsonl.gz.")],
    out: Annotated[Path, typer.Option(
        help="Directory to write the artifact to; must not exist or be empty (never overwritten).")],
    models: Annotated[str, typer.Option(
        help="Served models to train on, comma-separated (names as in the file's 'model' column), or 'all'. "
             "Several models train one model with the served model as a feature.")] = "all",
    quantile: Annotated[float, typer.Option(
        help="Target coverage q of the upper bound, in (0, 1). Use the quantile the service serves "
             "(TEMPO_QUANTILE, default 0.9).")] = 0.9,
    n_estimators: Annotated[int, typer.Option("--n-estimators", help="LightGBM boosting rounds.")] = 300,
    seed: Annotated[int, typer.Option(
        help="Random seed of the model (the fit / calibration / test split is by prompt hash, not seeded).")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report (JSON) here.")] = None,
) -> None:
    """Bootstrap the service's artifact from a dataset (the --help text is TRAIN_HELP)."""
    from rich.console import Console
    from tempo.estimator.train import train as run_train

    console = Console(stderr=True)
    with console.status("training") as status:
        report = run_train(data, prompts, out, models, quantile, n_estimators, seed,
                           on_stage=lambda text: status.update(text))
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    h, r = report.holdout, report.rows
    per_dataset = ", ".join(f"{name} {v['coverage']:.3f}" for name, v in h["coverage_by_dataset"].items())
    typer.echo(f"trained on {', '.join(report.models)}: {r['fit']} fit / {r['calibration']} calibration / "
               f"{r['test']} held-back rows (prompts disjoint) in {report.elapsed_s:.1f} s")
    typer.echo(f"held-back coverage {h['coverage']:.3f} (target {report.quantile}, +-{h['coverage_2se']:.3f} "
               f"over {h['prompts']} prompts); reserved/used {h['reserved_per_used']:.3f}")
    typer.echo(f"per dataset: {per_dataset}")
    typer.echo(f"artifact {report.version} at {report.path} (serve it: tempo estimator publish {report.path})")


@estimator_app.command("loadtest")
def loadtest(
    url: Annotated[str, typer.Option(help="Base URL of a running service.")] = "http://127.0.0.1:8100",
    concurrency: Annotated[int, typer.Option(help="Connections.", min=1, max=4096)] = 8,
    duration: Annotated[float, typer.Option(help="Seconds.", min=0.1)] = 10.0,
    batch: Annotated[int, typer.Option(help="Estimates per request (>1: the batch endpoint).", min=1)] = 1,
    rate: Annotated[float | None, typer.Option(help="Open loop: requests/s in total (default: closed loop).")] = None,
    distinct: Annotated[bool, typer.Option(help="A new prompt every request (defeats the service's caches).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Drive /v1/estimate (or :batch) and print req/s, estimates/s, p50/p99 latency."""
    from tempo.estimator.loadtest import run_load

    result = run_load(url, concurrency, duration, batch, rate, distinct=distinct)
    if result.requests == 0 or result.errors == result.requests:
        raise TempoError(f"no successful request to {url} ({result.errors} errors)")
    text = json.dumps(result.to_dict(), indent=2)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
    label = f"{result.mode}{' distinct' if distinct else ''}"
    typer.echo(f"{label}: {result.req_per_s:.0f} req/s, {result.estimates_per_s:.0f} estimates/s, "
               f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}")


@estimator_app.command("worker")
def worker(redis_url: RedisUrl = None, artifacts: Artifacts = None,
           consumer: Annotated[str | None, typer.Option(help="Consumer name in the online group.")] = None) -> None:
    """Run the online learner alone (the service runs it in-process by default)."""
    from tempo.estimator.engine import Estimator
    from tempo.estimator.worker import Background, OnlineWorker, RegistryWatcher

    settings = _settings(redis_url, artifacts, consumer=consumer)
    store = _store(settings)
    estimator = Estimator(settings.quantile)
    background = Background(OnlineWorker(store, estimator, settings),
                            RegistryWatcher(store, estimator, settings.artifacts_dir), settings.registry_poll_s)
    signal.signal(signal.SIGTERM, lambda *_: background.stop_event.set())
    background.start()
    try:
        while background.thread.is_alive():
            background.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    background.stop()


@estimator_app.command("publish")
def publish(directory: Annotated[Path, typer.Argument(help="A saved model artifact.")], redis_url: RedisUrl = None,
            artifacts: Artifacts = None,
            activate: Annotated[bool, typer.Option(help="Also make it the active version.")] = True,
            gate: Annotated[bool, typer.Option(help="Judge it first as the retraining job judges its candidates "
                                               "(coverage and overestimation against the active model on the "
                                               "held-back slice of recent completions); refuse it, exit 1, when "
                                               "it is worse.")] = True) -> None:
    """Verify an artifact (checksums), copy it under the artifacts directory, register (and activate) it."""
    from tempo.estimator.retrain import publish as run_publish
    from tempo.estimator.retrain import publish_gated
    from tempo.models.artifact import ArtifactError

    settings = _settings(redis_url, artifacts)
    try:
        if not gate:
            typer.echo(run_publish(_store(settings), directory, settings.artifacts_dir, activate))
            return
        report = publish_gated(_store(settings), settings, directory, activate=activate)
    except ArtifactError as exc:
        raise TempoError(str(exc)) from None
    typer.echo(json.dumps(report.to_dict(), indent=1))
    if report.status == "rejected":
        raise typer.Exit(1)


@estimator_app.command("rollback")
def rollback(redis_url: RedisUrl = None) -> None:
    """Re-activate the previously active model version."""
    settings = _settings(redis_url, None)
    typer.echo(_store(settings).rollback())


@estimator_app.command("replay-loop")
def replay_loop_command(
    loop: Annotated[Path, typer.Argument(help="A JSON written by 'tempo bench --engine vllm --learning-loop'.",
                                         exists=True, dir_okay=False)],
    orders: Annotated[int, typer.Option(help="Random orders of the same completions to replay.", min=0)] = 12,
    window: Annotated[list[int] | None, typer.Option(help="Rolling-coverage window (repeat for several).",
                                                     min=10)] = None,
    after: Annotated[int, typer.Option(help="Judge the windows ending at or after this completion.", min=1)] = 300,
    served_model: Annotated[str, typer.Option(help="The model name the loop's requests carried.")] = (
        "SmolLM2-135M-Instruct"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Replay a recorded learning loop offline through the estimator (batch model, River, calibrators): its
    rolling coverage in the recorded order, in random orders of the same completions, and an ideal bound's
    (covered with probability q, independently), so one order's luck is told apart from the learner's doing.
    The length model is the demo's bootstrap (trained on other LLMs' lengths; cached)."""
    from rich.progress import Progress
    from tempo.serving.bench.learning_replay import replay_loop

    with Progress(transient=True) as progress:
        task = progress.add_task("replaying", total=1.0)
        report = replay_loop(loop, orders=orders, windows=tuple(window or (100, 200, 300)), after=after,
                             served_model=served_model, on_progress=lambda f: progress.update(task, completed=f))
    summary = {w: {"recorded_from": r["recorded"]["within_0.03_from"],
                   "replayed_from": r["replayed_recorded_order"]["within_0.03_from"],
                   f"random_orders_within_by_{after}": r["replayed_random_orders"][f"within_0.03_by_{after}"],
                   "random_orders_late_share_within": r["replayed_random_orders"]["late_share_within_0.03"],
                   "ideal_p_every_window_within": r["ideal_bound"]["p_every_window_within_0.03"],
                   "ideal_late_share_within": round(r["ideal_bound"]["late_share_within_0.03"], 3)}
               for w, r in report["windows"].items()}
    typer.echo(json.dumps(summary, indent=1))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))


# -- eval-graphs lives in models/ and needs numpy only -------------------------------------------------------
from tempo.models.eval_graphs import EVAL_GRAPHS_HELP, eval_graphs_command  # noqa: E402

estimator_app.command("eval-graphs", help=EVAL_GRAPHS_HELP)(eval_graphs_command)


# -- eval lives in models/ and needs the 'ml' extra: without it the command says what is missing -----------
ML_MODULES = ("sklearn", "lightgbm", "quantile_forest", "scipy", "pandas")


def _missing_ml() -> list[str]:
    import importlib.util

    return [name for name in ML_MODULES if importlib.util.find_spec(name) is None]


def _needs_ml(missing: list[str]) -> TempoError:
    return TempoError(f"'tempo estimator eval' needs the 'ml' extra ({', '.join(missing)} not installed): "
                      "pip install 'tempo-serve[ml]', or use the environment 'make test' builds")


try:
    from tempo.models.eval_cli import eval_command as _eval_command
except ImportError as exc:
    _import_error = [exc.name or str(exc)]

    @estimator_app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_command() -> None:
        """Evaluate the length models (needs the 'ml' extra)."""
        raise _needs_ml(_import_error)
else:
    import functools

    @estimator_app.command("eval")
    @functools.wraps(_eval_command)
    def eval_command(*args: Any, **kwargs: Any) -> Any:
        missing = _missing_ml()
        if missing:
            raise _needs_ml(missing)
        return _eval_command(*args, **kwargs)
