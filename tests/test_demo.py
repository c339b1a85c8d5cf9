"""The demo's own accounting and workload (the run itself needs the engine: ``make demo``)."""

from __future__ import annotations

from tempo.models.job_graphs import GraphStore
from tempo.scheduler.slo import SLOClass
from tempo.serving.bounds.providers import fit_job_graphs
from tempo.serving.workloads.builder import COMPOUND_APP as TRAINED_APP
from tempo.serving.workloads.builder import WorkloadSpec, build_workload

from tempo.demo import ANSWER_CAP, COMPOUND_APP, COMPOUND_OUTPUT, COMPOUND_PROMPT, demo_shape, phase_seconds


def test_phase_seconds_split_the_whole_run_between_its_phases() -> None:
    marks = [("Redis", 10.0), ("serve", 10.5), ("run", 80.0)]
    phases = phase_seconds(marks, ended=200.04)
    assert phases == [("Redis", 0.5), ("serve", 69.5), ("run", 120.0)]
    assert sum(s for _, s in phases) == 190.0


def test_the_cut_compound_jobs_are_an_app_of_their_own() -> None:
    """The graph stores know the uncut deep-research jobs: the cut ones must not be matched against them."""
    workload = build_workload(WorkloadSpec(rps=2.0, duration_s=60.0, seed=3))
    shaped = demo_shape(workload)
    compound = [w for w in shaped if w.slo_class is SLOClass.COMPOUND]
    assert compound and {w.app for w in compound} == {COMPOUND_APP} != {TRAINED_APP}
    assert max(w.prompt_tokens for w in compound) <= COMPOUND_PROMPT
    assert max(w.output_tokens for w in compound) <= COMPOUND_OUTPUT
    others = [w for w in shaped if w.slo_class is not SLOClass.COMPOUND]
    assert others and COMPOUND_APP not in {w.app for w in others}
    assert max(w.output_tokens for w in others) <= ANSWER_CAP
    store: GraphStore = fit_job_graphs(workload, 0.9)
    assert COMPOUND_APP not in store.apps() and store.apps().get(TRAINED_APP, 0) > 0
    # what the uncut jobs' graphs expect after stage 0 is more than any cut job has left: matched against
    # them, a cut job would look several times longer than it is
    stages = max(w.stage for w in compound) + 1
    uncut = store.outlook(TRAINED_APP, 0, (), [COMPOUND_PROMPT])
    assert uncut.decode_tokens_after > 2 * COMPOUND_OUTPUT * (stages - 1)
    assert uncut.prefill_tokens_after > 2 * COMPOUND_PROMPT * (stages - 1)
