"""The compound-job pattern-graph store: kernel, pruning, sub-deadlines, fallback, calibration, memory, JSON."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tempo.models.job_graphs import FIELDS, GraphStore, PatternGraph, kernel, remaining_after
from tempo.scheduler.jobs import JobGraph, JobOutlookSource, JobProfile, StageOutlook

Job = tuple[str, JobGraph]
DECODE = FIELDS.index("decode_tokens_after")


def _ln(rng: np.random.Generator, median: float, sigma: float = 0.3) -> int:
    return max(1, round(float(rng.lognormal(math.log(median), sigma))))


def mixture(n: int, seed: int) -> list[Job]:
    """Three apps of other shapes than the deep-research file, each with signal in its early stages: chains of
    single calls (a long first answer means a long chain), wide fan-outs (the aggregator writes more the more
    calls it merges), and deep-research-like 4-or-6-stage jobs (a long second prompt means the job ends)."""
    rng = np.random.default_rng(seed)
    jobs: list[Job] = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            long = bool(rng.random() < 0.5)
            length = int(rng.integers(8, 12)) if long else int(rng.integers(2, 4))
            graph = [[(200, _ln(rng, 400 if long else 40))]] + [[(_ln(rng, 300), _ln(rng, 200, 0.5))]
                                                                for _ in range(length - 1)]
            jobs.append(("chain", graph))
        elif kind == 1:
            k = int(rng.integers(1, 13))
            calls = [(_ln(rng, 150), _ln(rng, 500, 0.5)) for _ in range(k)]
            graph = [[(_ln(rng, 300), _ln(rng, 80))], calls, [(sum(o for _, o in calls), _ln(rng, 60 * k))]]
            jobs.append(("fanout", graph))
        else:
            six = bool(rng.random() < 0.4)
            graph = [[(_ln(rng, 400), _ln(rng, 70))], [(160, _ln(rng, 700, 0.4))],
                     [(_ln(rng, 3000 if six else 300), _ln(rng, 100))], [(_ln(rng, 200), _ln(rng, 600, 0.4))]]
            if six:
                graph += [[(_ln(rng, 5000), _ln(rng, 100))], [(_ln(rng, 5000), _ln(rng, 700, 0.4))]]
            jobs.append(("research", graph))
    return jobs


def prompts(graph: JobGraph, stage: int) -> list[int]:
    return [p for p, _ in graph[stage]]


def coverage(store: GraphStore, jobs: list[Job]) -> float:
    covered = []
    for app, graph in jobs:
        truth, _ = remaining_after(graph)
        for stage in range(len(graph)):
            estimate = store.estimate(app, stage, graph[:stage], prompts(graph, stage))
            covered.append(estimate.bound["decode_tokens_after"] >= truth[stage, DECODE])
    return float(np.mean(covered))


@pytest.fixture(scope="module")
def train() -> list[Job]:
    return mixture(450, seed=1)


@pytest.fixture(scope="module")
def test_jobs() -> list[Job]:
    return mixture(450, seed=2)


@pytest.fixture(scope="module")
def store(train: list[Job]) -> GraphStore:
    return GraphStore(capacity=1000, half_life=math.inf).extend(train)


# -- the kernel --------------------------------------------------------------------------------------------------
calls = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 2000)), min_size=1, max_size=4)
graphs = st.lists(calls, min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(graphs, graphs)
def test_kernel_is_symmetric_in_0_1_and_1_on_identical_prefixes(a: JobGraph, b: JobGraph) -> None:
    ga, gb = PatternGraph(a), PatternGraph(b)
    value = kernel(ga, gb)
    assert value == pytest.approx(kernel(gb, ga))
    assert 0 < value <= 1
    assert kernel(ga, ga) == 1.0
    assert kernel(PatternGraph(a[:1]), ga) == 1.0  # a prefix of a graph is identical on what they share
    assert kernel(PatternGraph(a[:-1], prompts(a, len(a) - 1)), ga) == 1.0  # the running job: prompts only
    if PatternGraph(a[:1]).stats.tolist() != PatternGraph(b[:1]).stats.tolist():
        assert kernel(PatternGraph(a[:1]), PatternGraph(b[:1])) < 1.0


def test_kernel_weights_output_over_prompt() -> None:
    base = PatternGraph([[(400, 100)]])
    longer_output = PatternGraph([[(400, 200)]])
    longer_prompt = PatternGraph([[(800, 100)]])
    assert kernel(base, longer_output) < kernel(base, longer_prompt) < 1.0


def test_store_weights_are_the_kernel() -> None:
    stored = [[(300, 50)], [(150, 700), (160, 600)], [(1400, 90)]]
    store = GraphStore(capacity=10, min_weight=1e-9, half_life=math.inf).extend([("a", stored)])
    history, pending = [[(320, 60)]], [150, 170]
    estimate = store.estimate("a", 1, history, pending)
    assert estimate.weight == pytest.approx(kernel(PatternGraph(history, pending), PatternGraph(stored)))
    assert not estimate.fallback
    source: JobOutlookSource = store  # what the policy holds (structural; mypy checks it)
    assert source.outlook("a", 1, history, pending) == estimate.outlook()


# -- pruning -----------------------------------------------------------------------------------------------------
def test_a_stored_job_with_fewer_stages_than_the_history_never_matches() -> None:
    short = [[(100, 50)], [(100, 50)]]
    long = [*short, [(100, 900)], [(100, 900)]]  # the same first two stages, then two more
    store = GraphStore(capacity=100, half_life=math.inf).extend([("a", short)] * 20 + [("a", long)] * 5)
    assert store.estimate("a", 1, short[:1], [100]).weight == pytest.approx(25.0)  # all alike so far
    # at stage 2 the short jobs (identical to the history so far) are pruned: only the 4-stage jobs answer
    estimate = store.estimate("a", 2, short, [100])
    assert not estimate.fallback
    assert estimate.weight == pytest.approx(5.0)  # the 5 long jobs, nothing of the 20 identical short ones
    assert store.estimate("a", 2, short).weight == pytest.approx(5.0)  # stage 2's prompts not known: the same
    assert estimate.median["stages_after"] == 1 and estimate.median["decode_tokens_after"] == 900
    # past every stored stage: nothing matches, the job is assumed to end here
    beyond = store.estimate("a", 4, long, [100])
    assert beyond.fallback and beyond.bound["stages_after"] == 0 and beyond.sub_deadline_fraction == 1.0


def test_fan_out_prunes_and_decides() -> None:
    narrow = [[(300, 60)], [(150, 400)], [(400, 80)]]
    wide = [[(300, 60)], [(150, 400)] * 3, [(1200, 80)], [(500, 900)]]
    store = GraphStore(capacity=100, half_life=math.inf).extend([("a", narrow), ("a", wide)] * 10)
    assert store.estimate("a", 1, narrow[:1], [150]).bound["stages_after"] == 1
    assert store.estimate("a", 1, narrow[:1], [150, 150, 150]).bound["stages_after"] == 2
    assert store.estimate("a", 1, narrow[:1], [150] * 8).fallback  # no stored job ever fanned out 8 ways


# -- sub-deadlines -----------------------------------------------------------------------------------------------
def test_sub_deadline_fraction_is_monotone_and_1_at_the_last_stage(store: GraphStore, test_jobs: list[Job]) -> None:
    for app, graph in test_jobs[:150]:
        fractions = [store.outlook(app, s, graph[:s], prompts(graph, s)).sub_deadline_fraction
                     for s in range(len(graph))]
        assert all(f is not None and 0 < f <= 1 for f in fractions)
        assert all(b >= a for a, b in itertools.pairwise(fractions)), (app, fractions)
    fixed = [[(200, 40)], [(150, 300), (150, 500)], [(800, 60)]]  # a job shape that always ends after stage 2
    fixed_store = GraphStore(capacity=50).extend([("f", fixed)] * 10)
    fractions = [fixed_store.outlook("f", s, fixed[:s], prompts(fixed, s)).sub_deadline_fraction for s in range(3)]
    _, true_phi = remaining_after(fixed)
    assert fractions[-1] == 1.0
    assert fractions == pytest.approx(list(true_phi))  # one shape: the matched graphs' phi is the job's own
    assert fractions[0] < fractions[1] < fractions[2]


# -- fallback ----------------------------------------------------------------------------------------------------
def test_unseen_app_gets_the_empty_outlook(store: GraphStore) -> None:
    outlook = store.outlook("never-seen", 1, [[(100, 100)]], [100])
    assert outlook == StageOutlook()
    assert store.estimate("never-seen", 0).fallback


def test_history_unlike_anything_falls_back_to_the_per_app_quantiles(store: GraphStore, train: list[Job]) -> None:
    profile = JobProfile.fit(train, store.quantile)
    for stage in (1, 2):
        history = [[(90_000, 90_000)]] * stage
        estimate = store.estimate("chain", stage, history, [90_000])
        assert estimate.fallback
        expected = profile.outlook("chain", stage)
        outlook = estimate.outlook()
        for name in ("stages_after", "decode_tokens_after", "prefill_tokens_after", "tokens_after", "samples"):
            assert getattr(outlook, name) == pytest.approx(getattr(expected, name)), name
    matched = store.estimate("chain", 1, [[(200, 400)]], [300])
    assert not matched.fallback  # a familiar history does match
    assert matched.bound["stages_after"] > store.estimate("chain", 1, [[(200, 40)]], [300]).bound["stages_after"]


# -- the bound ---------------------------------------------------------------------------------------------------
def test_bound_covers_held_out_jobs_and_matching_beats_the_fallback(store: GraphStore, test_jobs: list[Job],
                                                                   train: list[Job]) -> None:
    assert 0.85 <= coverage(store, test_jobs) <= 0.97
    median = JobProfile.fit(train, 0.5)
    graph_errors, profile_errors = [], []
    for app, graph in test_jobs:
        if app != "chain" or len(graph) < 2:
            continue
        truth, _ = remaining_after(graph)
        graph_errors.append(abs(store.estimate(app, 1, graph[:1], prompts(graph, 1)).median["decode_tokens_after"]
                                - truth[1, DECODE]))
        profile_errors.append(abs(median.outlook(app, 1).decode_tokens_after - truth[1, DECODE]))
    assert np.median(graph_errors) < 0.75 * np.median(profile_errors)


def test_calibration_restores_coverage_where_few_matches_under_cover() -> None:
    rng = np.random.default_rng(0)

    def job() -> JobGraph:  # an uninformative prompt; a narrow kernel leaves a handful of matches
        return [[(max(1, int(rng.lognormal(6, 1.0))), 50)], [(100, max(1, int(rng.lognormal(6, 0.8))))]]

    store = GraphStore(capacity=1000, bandwidth=0.01, min_weight=0.05, half_life=math.inf)
    store.extend(("a", job()) for _ in range(300))
    held_out = [("a", job()) for _ in range(400)]
    covered = []
    for app, graph in held_out:
        truth, _ = remaining_after(graph)
        estimate = store.estimate(app, 0, (), prompts(graph, 0))
        covered.append(estimate.bound["decode_tokens_after"] >= truth[0, DECODE])
    assert np.mean(covered) >= 0.84  # the raw weighted q-quantile of these matches covers about 0.72
    assert store.calibration()["a"]["0"]["offsets"]["decode_tokens_after"] > 0.3


def test_consolidation_keeps_the_bound_and_the_capacity(store: GraphStore, train: list[Job],
                                                        test_jobs: list[Job]) -> None:
    small = GraphStore(capacity=60).extend(train)  # 150 jobs per app: consolidated twice or more
    assert all(count <= 60 for count in small.apps().values())
    assert small.mass("chain") == pytest.approx(150)  # medoids carry their clusters' jobs
    reference = coverage(store, test_jobs)
    assert abs(coverage(small, test_jobs) - reference) <= 0.05
    assert coverage(small, test_jobs) >= 0.85


def test_graphs_not_matched_decay_away_and_matched_ones_stay() -> None:
    rng = np.random.default_rng(0)

    def job(prompt: int) -> JobGraph:
        return [[(prompt, _ln(rng, 100))], [(200, _ln(rng, 300))]]

    for keep_old in (False, True):
        store = GraphStore(capacity=500, half_life=10, min_freshness=0.1, min_weight=1.0)
        store.extend(("a", job(5000)) for _ in range(20))
        assert not store.estimate("a", 0, (), [5000]).fallback
        for _ in range(80):
            store.add("a", job(100))
            store.estimate("a", 0, (), [100])
            if keep_old:
                store.estimate("a", 0, (), [5000])
        old = store.estimate("a", 0, (), [5000])
        assert old.fallback is not keep_old  # unmatched for 8 half-lives: dropped; matched: kept
        assert len(store) == (100 if keep_old else 80)
        new_jobs = [("a", job(100)) for _ in range(100)]
        assert coverage(store, new_jobs) >= 0.8


def test_memory_stays_flat_over_ten_times_the_capacity() -> None:
    jobs = mixture(1500, seed=3)
    store = GraphStore(capacity=50)
    sizes = []
    for i, (app, graph) in enumerate(jobs, start=1):
        store.add(app, graph)
        assert max(store.apps().values()) <= 50
        if i >= 150:  # every app full
            sizes.append(store.nbytes())
    assert max(sizes) <= 1.05 * sizes[0] + 4096 and min(sizes) >= 0.5 * sizes[0]


# -- JSON --------------------------------------------------------------------------------------------------------
def test_json_round_trip(train: list[Job], test_jobs: list[Job]) -> None:
    original = GraphStore(capacity=80, half_life=300).extend(train)
    original.estimate("chain", 1, [[(200, 400)]], [300])  # a pending match, applied at the next add
    text = json.dumps(original.to_dict(), allow_nan=False)
    copy = GraphStore.from_dict(json.loads(text))
    assert copy.apps() == original.apps() and copy.nbytes() == original.nbytes()
    for app, graph in test_jobs[:60]:
        for stage in range(len(graph)):
            args = (app, stage, graph[:stage], prompts(graph, stage))
            assert copy.estimate(*args) == original.estimate(*args)
    for store in (original, copy):
        store.extend(train[:30])
    assert copy.to_dict() == original.to_dict()
    with pytest.raises(ValueError, match="not a graph store"):
        GraphStore.from_dict({"format": "something else"})
    with pytest.raises(ValueError, match="not a graph store"):
        GraphStore.from_dict({"format": "tempo.graph_store/1", "params": {}})


def test_bad_input_is_rejected() -> None:
    store = GraphStore()
    with pytest.raises(ValueError):
        store.add("a", [])
    with pytest.raises(ValueError):
        store.add("a", [[(10, 10)], []])
    with pytest.raises(ValueError):
        store.add("a", [[(-1, 10)]])
    with pytest.raises(ValueError):
        GraphStore(quantile=1.0)


def test_kmedoids_on_duplicate_graphs_keeps_distinct_medoids_each_with_mass() -> None:
    """Identical graphs (calls of fixed sizes, as a load generator sends) tie at distance 0: no two clusters
    may end on one row, and none may be left empty (zero mass made match weights NaN in a soak)."""
    from tempo.models.job_graphs import weighted_kmedoids

    for trial in range(300):
        rng = np.random.default_rng(trial)
        n = int(rng.integers(5, 40))
        k = int(rng.integers(2, n))
        points = rng.integers(0, 3, size=(n, 2)).astype(float)
        distance = ((points[:, None] - points[None]) ** 2).sum(-1)
        mass = rng.integers(1, 4, size=n).astype(float)
        medoids, labels = weighted_kmedoids(distance, mass, k, rng)
        assert len(set(medoids.tolist())) == len(medoids) == k, trial
        assert (np.bincount(labels, weights=mass, minlength=k) > 0).all(), trial
        assert (labels[medoids] == np.arange(k)).all()


def test_non_finite_match_weights_fall_back_to_the_per_app_quantiles() -> None:
    store = GraphStore(capacity=50)
    for i in range(20):
        store.add("a", (((100, 50 + i),), ((200, 30 + i),)))
    store._apps["a"].fresh[3] = np.nan
    estimate = store.estimate("a", 1, (((100, 55),),), [200])
    assert estimate.fallback and math.isfinite(estimate.samples)
    assert estimate.outlook().samples == 20
