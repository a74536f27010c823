"""Metrics users read off `tagger evaluate`: classification, selective, threshold, incremental."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from trainer.metrics import (
    ABSTAIN,
    ABSTAIN_ALL,
    aggregate_incremental,
    aurc,
    choose_threshold,
    classification_metrics,
    clopper_pearson_lower,
    clustered_lower,
    incremental_from_emissions,
    incremental_metrics,
    offline_metrics,
    outputs_from_emissions,
    outputs_to_emissions,
    precision_lower,
    risk_coverage_curve,
    selective_metrics,
)
from trainer.report import format_summary, plot_risk_coverage, write_report

LABELS = ["Look Up Customer Account", "Paperwork", "Additional Fees", "Idle"]


def json_safe(obj) -> str:
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------- strategies

@st.composite
def tagged(draw, max_size=40, abstain=False):
    """(y_true, y_pred, conf) over LABELS."""
    n = draw(st.integers(0, max_size))
    ids = st.integers(ABSTAIN if abstain else 0, len(LABELS) - 1)
    y_true = draw(st.lists(st.integers(0, len(LABELS) - 1), min_size=n, max_size=n))
    y_pred = draw(st.lists(ids, min_size=n, max_size=n))
    conf = draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), min_size=n, max_size=n))
    return np.array(y_true, int), np.array(y_pred, int), np.array(conf)


@st.composite
def scored(draw, max_size=60, conf_values=None):
    """(correct, conf)."""
    n = draw(st.integers(0, max_size))
    correct = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    values = (st.sampled_from(conf_values) if conf_values
              else st.floats(0, 1, allow_nan=False))
    conf = draw(st.lists(values, min_size=n, max_size=n))
    return np.array(correct, bool), np.array(conf, float)


LABEL = st.sampled_from(["A", "B", "C", None])


@st.composite
def sessions(draw, max_n=8):
    """O_1..O_n, each O_t drawn freely (length t + 1)."""
    n = draw(st.integers(0, max_n))
    return [draw(st.lists(LABEL, min_size=t + 1, max_size=t + 1)) for t in range(n)]


@st.composite
def emission_logs(draw, max_n=8):
    """(n, emissions): every position labelled at its own step, plus random revisions."""
    n = draw(st.integers(0, max_n))
    em = [(j, j, draw(LABEL)) for j in range(n)]
    if n:
        extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), LABEL),
                              max_size=3 * n))
        em += [(min(j, t), max(j, t), lab) for j, t, lab in extra]
    return n, draw(st.permutations(em))


# ------------------------------------------------------------------- classification

def test_classification_hand_example():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, ABSTAIN], LABELS)
    assert m["token_accuracy"] == 0.5
    assert m["labels_present"] == LABELS[:3]          # "Idle" is absent: not in macro-F1
    assert m["per_class"]["Paperwork"] == {"precision": 1.0, "recall": 0.5,
                                           "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["Additional Fees"]["precision"] == 0.0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["top_confusions"] == [{"true": "Paperwork", "pred": "Additional Fees",
                                    "count": 1, "share_of_true": 0.5}]
    assert m["confusion"] == {"labels": LABELS[:3],
                              "matrix": [[1, 0, 0], [0, 1, 1], [0, 0, 0]]}
    assert m["n_abstained"] == 1


@settings(max_examples=150, deadline=None)
@given(tagged(abstain=True))
def test_classification_matches_sklearn(data):
    y, p, _ = data
    m = classification_metrics(y, p, LABELS)
    json_safe(m)
    if not len(y):
        assert m["token_accuracy"] is None and m["macro_f1"] is None
        return
    present = sorted(set(y.tolist()))
    assert m["token_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(
        f1_score(y, p, labels=present, average="macro", zero_division=0))
    assert sum(c["support"] for c in m["per_class"].values()) == len(y)
    counts = [c["count"] for c in m["top_confusions"]]
    assert counts == sorted(counts, reverse=True) and len(counts) <= 10
    assert np.sum(m["confusion"]["matrix"]) == np.sum(p != ABSTAIN)


def test_label_never_predicted_has_undefined_precision_and_zero_f1():
    m = classification_metrics([0, 0, 1], [0, 0, 0], LABELS)
    assert m["per_class"]["Paperwork"] == {"precision": None, "recall": 0.0, "f1": 0.0,
                                           "support": 1}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)


def test_label_only_predicted_is_shown_but_not_averaged():
    m = classification_metrics([0, 0], [0, 3], LABELS)
    assert m["per_class"]["Idle"]["recall"] is None and m["per_class"]["Idle"]["support"] == 0
    assert m["labels_present"] == [LABELS[0]]
    assert m["macro_f1"] == pytest.approx(2 / 3)      # only class 0: P 1, R 0.5


@pytest.mark.parametrize("y,p", [([], []), ([2, 2, 2], [2, 2, 2]),
                                 ([1, 2], [ABSTAIN, ABSTAIN])])
def test_classification_edge_cases_are_json_safe(y, p):
    m = classification_metrics(y, p, LABELS)
    json_safe(m)
    if y and y == p:
        assert m["token_accuracy"] == 1.0 and m["macro_f1"] == 1.0
        assert m["top_confusions"] == []


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([4], [0], LABELS)
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1], [0], LABELS)


# ------------------------------------------------------------------ selective prediction

@settings(max_examples=150, deadline=None)
@given(tagged(abstain=True), st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.95, 1.0, ABSTAIN_ALL]))
def test_selective_metrics_on_covered_events(data, thr):
    y, p, c = data
    m = selective_metrics(y, p, c, thr, LABELS)
    json_safe(m)
    cov = (c >= thr) & (p != ABSTAIN)
    assert m["n_covered"] == cov.sum() and m["n_abstained"] == len(y) - cov.sum()
    if cov.any():
        assert m["selective_accuracy"] == pytest.approx(np.mean(y[cov] == p[cov]))
        present = sorted(set(y.tolist()))
        assert m["selective_macro_f1"] == pytest.approx(
            f1_score(y[cov], p[cov], labels=present, average="macro", zero_division=0))
    else:
        assert m["selective_accuracy"] is None and m["selective_risk"] is None


@settings(max_examples=100, deadline=None)
@given(tagged(max_size=60))
def test_coverage_never_rises_with_the_threshold(data):
    y, p, c = data
    covs = [selective_metrics(y, p, c, t, LABELS)["coverage"] or 0.0
            for t in np.linspace(0, 1.01, 30)]
    assert all(a >= b for a, b in zip(covs, covs[1:]))


def test_all_abstained_is_json_safe():
    m = selective_metrics([0, 1], [0, 1], [0.2, 0.3], ABSTAIN_ALL, LABELS)
    json_safe(m)
    assert m["coverage"] == 0.0 and m["selective_accuracy"] is None
    assert m["selective_macro_f1"] == 0.0   # every present class fully abstained on


@settings(max_examples=150, deadline=None)
@given(scored(conf_values=[0.2, 0.4, 0.6, 0.8]))
def test_risk_coverage_curve_shape(data):
    ok, c = data
    cov, risk, thr = risk_coverage_curve(ok, c, return_thresholds=True)
    assert len(cov) == len(risk) == len(thr) == len(set(c.tolist()))
    if len(ok):
        assert np.all(np.diff(cov) > 0) and cov[-1] == 1.0
        assert np.all(np.diff(thr) < 0)
        assert risk[-1] == pytest.approx(1 - ok.mean())
        for cv, r, t in zip(cov, risk, thr):
            sel = c >= t
            assert cv == pytest.approx(sel.mean()) and r == pytest.approx(1 - ok[sel].mean())


def _aurc_fixed_order(ok_in_order):
    errors = np.cumsum(~ok_in_order)
    return np.mean(errors / np.arange(1, len(ok_in_order) + 1))


def test_aurc_hand_example():
    # levels: 0/1, tie {right, wrong} -> 0.5/2, 1/3, 2/4
    assert aurc([1, 1, 0, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(
        (0 + 0.25 + 1 / 3 + 0.5) / 4)
    assert aurc([], []) is None


@settings(max_examples=60, deadline=None)
@given(scored(max_size=6, conf_values=[0.1, 0.5, 0.9]))
def test_aurc_ties_average_over_every_order_of_the_tied_events(data):
    ok, c = data
    if not len(ok):
        return
    brute = np.mean([_aurc_fixed_order(ok[list(perm)][np.argsort(-c[list(perm)], kind="stable")])
                     for perm in itertools.permutations(range(len(ok)))])
    assert aurc(ok, c) == pytest.approx(brute)


@settings(max_examples=150, deadline=None)
@given(scored(), st.randoms(use_true_random=False))
def test_aurc_perfect_ranking_beats_reversed(data, rnd):
    ok, c = data
    if not len(ok):
        return
    perm = list(range(len(ok)))
    rnd.shuffle(perm)
    assert aurc(ok, c) == pytest.approx(aurc(ok[perm], c[perm]))      # order-free
    rank = np.arange(len(ok), dtype=float) / len(ok)
    perfect = np.where(ok, 1 + rank, rank)      # every right one above every wrong one
    reverse = np.where(ok, rank, 1 + rank)
    assert aurc(ok, perfect) <= aurc(ok, c) + 1e-12 <= aurc(ok, reverse) + 2e-12
    assert aurc(ok, np.full(len(ok), 0.5)) == pytest.approx(1 - ok.mean())


# -------------------------------------------------------------------- threshold choice

def test_clopper_pearson_all_correct_has_closed_form():
    # k = m: the bound solves p^m = 1 - confidence
    assert clopper_pearson_lower(45, 45, 0.9) == pytest.approx(0.1 ** (1 / 45))
    assert clopper_pearson_lower(0, 10, 0.9) == 0.0


@settings(max_examples=200, deadline=None)
@given(scored(max_size=300, conf_values=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]),
       st.sampled_from([0.8, 0.9, 0.95]), st.sampled_from([0.8, 0.9, 0.95]))
def test_binomial_threshold_is_certified_and_never_below_empirical(data, target, conf_level):
    ok, c = data
    b = choose_threshold(ok, c, target, conf_level, method="binomial")
    e = choose_threshold(ok, c, target, conf_level, method="empirical")
    json_safe(b), json_safe(e)
    if e["feasible"]:
        assert e["precision"] >= target
        assert np.mean(ok[c >= e["threshold"]]) == pytest.approx(e["precision"])
    if b["feasible"]:
        assert b["lower_bound"] >= target
        assert b["precision"] >= b["lower_bound"]
        assert e["feasible"] and e["threshold"] <= b["threshold"]
        assert b["coverage"] == pytest.approx(np.mean(c >= b["threshold"]))
    else:
        assert b["threshold"] == ABSTAIN_ALL > 1.0 and b["coverage"] in (0.0, None)


def test_binomial_threshold_scans_down_and_stops_at_first_failure():
    # 100 events at 0.9, all right; 10 at 0.8, all wrong; 1000 at 0.7, all right.
    # Empirical precision at 0.7 is 1100/1110 > 0.95, but the fixed sequence stops at 0.8.
    c = np.r_[np.full(100, 0.9), np.full(10, 0.8), np.full(1000, 0.7)]
    ok = np.r_[np.ones(100), np.zeros(10), np.ones(1000)].astype(bool)
    b = choose_threshold(ok, c, 0.95, 0.9)
    assert b["feasible"] and b["threshold"] == pytest.approx(0.9, abs=2e-6) and b["n_covered"] == 100
    assert choose_threshold(ok, c, 0.95, 0.9, method="empirical")["threshold"] == pytest.approx(0.7, abs=2e-6)


def test_an_event_as_confident_as_the_threshold_is_covered_despite_float_rounding():
    """The threshold sits a hair below the chosen confidence: an event that repeats a
    validation event, scored by a path that sums in another order, is labelled either way."""
    c = np.r_[np.full(200, 0.99993), np.full(10, 0.5)]
    ok = np.r_[np.ones(200), np.zeros(10)].astype(bool)
    thr = choose_threshold(ok, c, 0.95, 0.9)["threshold"]
    for seen in (0.99993, np.nextafter(np.float32(0.99993), np.float32(0)), 0.99993 - 1e-7):
        assert seen >= thr
    assert 0.5 < thr < 0.99993


def test_binomial_guarantee_holds_in_simulation():
    # True precision 0.93 < target 0.95: certifying any threshold is a false claim, which the
    # procedure may make at most 1 - confidence = 10% of the time.
    rng = np.random.default_rng(7)
    trials, claims = 1000, 0
    for _ in range(trials):
        c = rng.choice([0.6, 0.8, 0.9], size=300)
        ok = rng.random(300) < 0.93
        claims += choose_threshold(ok, c, 0.95, 0.9)["feasible"]
    assert claims / trials <= 0.10 + 0.02


def _days(rng, days: int, per_day: int, spread: float):
    """Held-out or new working days: confidences, whether each label is right, each event's
    day. A day's labels are right more or less often than the confidence says (its logit
    shifted by a normal draw of sd ``spread``), as a day's own titles and habits make them."""
    day = np.repeat(np.arange(days), per_day)
    conf = rng.uniform(0.5, 1.0, days * per_day)
    logit = 20 * (conf - 0.7) + rng.normal(0.0, spread, days)[day]
    return rng.random(days * per_day) < 1 / (1 + np.exp(-logit)), conf, day


def test_a_precision_bound_over_sessions_keeps_its_guarantee_on_new_days_where_one_over_events_does_not():
    """Sixteen held-out days whose precision varies from day to day: the binomial bound
    treats their 4,800 events as independent and certifies thresholds that new days miss
    far more often than 1 - confidence allows; the bound over sessions keeps to it, for a
    little coverage."""
    rng = np.random.default_rng(0)
    trials = 200
    missed = {"events": 0, "sessions": 0}
    coverage = {"events": [], "sessions": []}
    for _ in range(trials):
        ok, conf, day = _days(rng, 16, 300, spread=0.6)
        new_ok, new_conf, _ = _days(rng, 400, 300, spread=0.6)     # the days to come
        for over, sessions in (("events", None), ("sessions", day)):
            chosen = choose_threshold(ok, conf, 0.95, 0.9, sessions=sessions)
            shown = new_conf >= chosen["threshold"]
            coverage[over].append(shown.mean())
            missed[over] += bool(shown.any() and new_ok[shown].mean() < 0.95)
    assert missed["events"] / trials > 0.15                     # the binomial claim fails
    assert missed["sessions"] / trials <= 0.10 + 0.02           # this one holds
    assert 0.85 < np.mean(coverage["sessions"]) / np.mean(coverage["events"]) < 1.0


def test_a_precision_bound_over_sessions_costs_little_when_days_do_not_differ_and_never_certifies_more():
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(40):
        ok, conf, day = _days(rng, 16, 300, spread=0.0)
        events = choose_threshold(ok, conf, 0.95, 0.9)
        sessions = choose_threshold(ok, conf, 0.95, 0.9, sessions=day)
        assert sessions["threshold"] >= events["threshold"]
        assert sessions["lower_bound"] is None or sessions["lower_bound"] >= 0.95
        if events["coverage"]:
            ratios.append(sessions["coverage"] / events["coverage"])
        else:
            assert not sessions["coverage"]
    assert len(ratios) > 30 and np.median(ratios) > 0.95


def test_the_threshold_scan_over_sessions_bounds_exactly_the_events_it_covers():
    """The scan adds events from the most confident down and keeps running sums; whatever
    threshold it picks, its bound is the one computed afresh from the covered events' counts
    per session."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(30):
        n = int(rng.integers(50, 600))
        conf = np.round(rng.uniform(0.5, 1.0, n), 2)             # ties, as real confidences have
        day = rng.integers(0, int(rng.integers(2, 12)), n)
        ok = rng.random(n) < conf ** np.where(day % 3 == 0, 3.0, 0.1)
        chosen = choose_threshold(ok, conf, 0.9, 0.9, sessions=day)
        if not chosen["feasible"]:
            continue
        covered = conf >= chosen["threshold"]
        assert chosen["n_covered"] == covered.sum()
        assert chosen["lower_bound"] == pytest.approx(precision_lower(ok, covered, day, 0.9), abs=1e-9)
        assert chosen["lower_bound"] >= 0.9
        checked += 1
    assert checked >= 10


def test_the_bound_over_sessions_is_the_binomial_one_where_sessions_cannot_differ():
    # one session, or every covered label right: no between-session spread to read
    assert clustered_lower([90], [100], 0.9) == pytest.approx(clopper_pearson_lower(90, 100, 0.9))
    assert clustered_lower([50, 40], [50, 40], 0.9) == pytest.approx(clopper_pearson_lower(90, 90, 0.9))
    # two sessions alike: the spread is 0 and so is the widening
    assert clustered_lower([45, 45], [50, 50], 0.9) == pytest.approx(clopper_pearson_lower(90, 100, 0.9))
    # two that differ: wider
    assert clustered_lower([50, 40], [50, 50], 0.9) < clopper_pearson_lower(90, 100, 0.9)
    assert precision_lower([1, 1, 0, 1], [1, 1, 1, 0], ["a", "a", "b", "b"], 0.9) == pytest.approx(
        float(clustered_lower([2, 0], [2, 1], 0.9)))
    with pytest.raises(ValueError, match="sessions holds 2 ids for 3 events"):
        choose_threshold([1, 1, 0], [0.9, 0.8, 0.7], sessions=["a", "b"])


def test_infeasible_threshold_abstains_on_everything():
    r = choose_threshold([False, True, False], [0.9, 0.8, 0.7])
    assert r["feasible"] is False and r["threshold"] > 1.0 and r["coverage"] == 0.0
    assert selective_metrics([0, 1, 2], [1, 1, 1], [0.9, 0.8, 1.0], r["threshold"],
                             LABELS)["n_covered"] == 0
    assert choose_threshold([], [])["feasible"] is False


def test_fixed_grid_and_argument_checks():
    ok = np.ones(200, bool)
    c = np.linspace(0.01, 1, 200)
    r = choose_threshold(ok, c, grid=[0.25, 0.5, 0.75])
    assert r["feasible"] and r["threshold"] == 0.25
    with pytest.raises(ValueError, match="method"):
        choose_threshold(ok, c, method="bonferroni")


# ---------------------------------------------------------------- incremental metrics

def oracle(outputs, gold=None):
    """The DESIGN.md definitions, computed literally on O_1..O_n."""
    n = len(outputs)
    edits, last_change = 0, {}
    for t, o in enumerate(outputs):
        edits += 1                          # the addition of position t
        last_change[t] = t
        for j in range(t):
            if o[j] != outputs[t - 1][j]:
                edits += 1
                last_change[j] = t
    if n == 0:
        return {"edit_overhead": None, "correction_time": 0.0, "relative_correctness": None}
    final = outputs[-1]
    out = {
        "edit_overhead": (edits - n) / edits,
        "correction_time": (sum(last_change[j] - j for j in range(n)) / (n * (n - 1) / 2)
                            if n > 1 else 0.0),
        "relative_correctness": sum(o == final[:t + 1] for t, o in enumerate(outputs)) / n,
    }
    if gold is not None:
        first = [outputs[j][j] for j in range(n)]
        out["first_accuracy"] = np.mean([f is not None and f == g for f, g in zip(first, gold)])
        out["final_accuracy"] = np.mean([f is not None and f == g for f, g in zip(final, gold)])
    return out


def test_incremental_hand_example_revising_two_labels():
    outputs = [["A"], ["B", "A"], ["B", "C", "C"]]
    m = incremental_metrics(outputs, gold=["B", "C", "D"], offline=["B", "C", "C"])
    # edits: 1 + (1 change + 1) + (1 change + 1) = 5 for n = 3
    assert m["edits"] == 5 and m["edit_overhead"] == pytest.approx(2 / 5)
    # position 0 settles 1 step late, position 1 settles 1 step late: 2 / (3*2/2)
    assert m["correction_time"] == pytest.approx(2 / 3)
    # only O_3 agrees with the final output
    assert m["relative_correctness"] == pytest.approx(1 / 3)
    assert m["first_accuracy"] == 0.0 and m["final_accuracy"] == pytest.approx(2 / 3)
    assert m["final_equals_offline"] == 1.0


def test_incremental_hand_example_flip_and_back():
    # A -> B -> A: two edits; position 0 is right at steps 1 and 3, not at step 2
    m = incremental_metrics([["A"], ["B", "X"], ["A", "X", "Y"]])
    assert m["edit_overhead"] == pytest.approx(2 / 5)
    assert m["correction_time"] == pytest.approx(2 / 3)
    assert m["relative_correctness"] == pytest.approx(2 / 3)


def test_incremental_abstention_counts_as_wrong_or_is_excluded_explicitly():
    m = incremental_metrics([[None], ["L", "L"]], gold=["L", "M"])
    assert m["edit_overhead"] == pytest.approx(1 / 3)
    assert m["correction_time"] == 1.0 and m["relative_correctness"] == 0.5
    assert m["first_accuracy"] == 0.0                 # None and a wrong "L"
    assert m["first_accuracy_answered"] == 0.0 and m["n_first_answered"] == 1
    assert m["final_accuracy"] == 0.5 and m["final_accuracy_answered"] == 0.5
    everything_abstained = incremental_metrics([[None], [None, None]], gold=["L", "M"])
    json_safe(everything_abstained)
    assert everything_abstained["final_accuracy"] == 0.0
    assert everything_abstained["final_accuracy_answered"] is None


@settings(max_examples=100, deadline=None)
@given(st.lists(LABEL, max_size=12))
def test_never_revised_session_is_perfectly_incremental(final):
    outputs = [final[:t + 1] for t in range(len(final))]
    m = incremental_metrics(outputs, gold=final)
    json_safe(m)
    assert m["correction_time"] == 0.0
    if final:
        assert m["edit_overhead"] == 0.0 and m["relative_correctness"] == 1.0
        assert m["first_accuracy"] == m["final_accuracy"]


@settings(max_examples=300, deadline=None)
@given(sessions())
def test_incremental_matches_the_literal_definitions(outputs):
    gold = ["A"] * len(outputs)
    m = incremental_metrics(outputs, gold=gold)
    for key, value in oracle(outputs, gold=gold).items():
        assert m[key] == pytest.approx(value), key
    if outputs:
        assert 0.0 <= m["edit_overhead"] < 1.0 and 0.0 <= m["correction_time"] <= 1.0


@settings(max_examples=300, deadline=None)
@given(sessions())
def test_outputs_survive_a_round_trip_through_emissions(outputs):
    n = len(outputs)
    assert outputs_from_emissions(n, outputs_to_emissions(outputs)) == outputs


@settings(max_examples=300, deadline=None)
@given(emission_logs())
def test_emissions_and_outputs_give_the_same_metrics(log):
    n, emissions = log
    outputs = outputs_from_emissions(n, emissions)
    gold = ["A"] * n
    assert incremental_from_emissions(n, emissions, gold, gold) == \
        incremental_metrics(outputs, gold, gold)
    want = oracle(outputs)
    got = incremental_from_emissions(n, emissions)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_emissions_reconstruct_outputs_and_ignore_repeats():
    # position 0 re-emitted unchanged at step 1 (a confidence change): not an edit
    em = [(0, 0, "A"), (1, 1, "B"), (0, 1, "A"), (0, 2, "C"), (2, 2, None)]
    assert outputs_from_emissions(3, em) == [["A"], ["A", "B"], ["C", "B", None]]
    m = incremental_from_emissions(3, em)
    assert m["edits"] == 4 and m["revisions"] == 1


def test_malformed_incremental_input_is_rejected():
    with pytest.raises(ValueError, match="own step"):
        incremental_from_emissions(2, [(0, 0, "A"), (1, 1, "B")][:1])
    with pytest.raises(ValueError, match="outside"):
        incremental_from_emissions(2, [(0, 0, "A"), (1, 1, "B"), (1, 0, "C")])
    with pytest.raises(ValueError, match="labels"):
        incremental_metrics([["A"], ["A"]])
    with pytest.raises(ValueError, match="gold"):
        incremental_metrics([["A"]], gold=["A", "B"])


def test_empty_and_single_event_sessions():
    empty = incremental_metrics([], gold=[])
    json_safe(empty)
    assert empty["edit_overhead"] is None and empty["first_accuracy"] is None
    one = incremental_metrics([["A"]], gold=["A"])
    assert one["edit_overhead"] == 0.0 and one["correction_time"] == 0.0
    assert one["relative_correctness"] == 1.0 and one["final_accuracy"] == 1.0


def test_aggregate_weights_sessions_by_their_events():
    a = incremental_metrics([["A"], ["B", "A"], ["B", "C", "C"]], gold=["B", "C", "D"])
    b = incremental_metrics([["A"]], gold=["A"])
    agg = aggregate_incremental([a, b])
    assert agg["sessions"] == 2 and agg["events"] == 4
    assert agg["edit_overhead"] == pytest.approx((3 * 0.4 + 1 * 0.0) / 4)
    assert agg["relative_correctness"] == pytest.approx((3 * (1 / 3) + 1) / 4)
    # accuracies pool events: 2 of 3 and 1 of 1 final labels right
    assert agg["final_accuracy"] == pytest.approx(3 / 4)
    plain = aggregate_incremental([a, b], weights="sessions")
    assert plain["edit_overhead"] == pytest.approx(0.2)
    assert plain["final_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    empty = aggregate_incremental([incremental_metrics([], gold=[])])
    json_safe(empty)
    assert empty["edit_overhead"] is None and empty["events"] == 0
    json_safe(aggregate_incremental([]))


# --------------------------------------------------------------------------- report

def _report_metrics(n_labels=6, n=600, seed=0):
    rng = np.random.default_rng(seed)
    labels = [f"Step {i}: verify the caller's identity and the account holder details"
              if i % 3 == 0 else f"Step {i}" for i in range(n_labels)]
    y = rng.integers(0, n_labels, n)
    p = np.where(rng.random(n) < 0.8, y, rng.integers(0, n_labels, n))
    c = np.clip(np.where(p == y, 0.75, 0.45) + rng.normal(0, 0.15, n), 0, 1)
    return offline_metrics(y, p, c, 0.7, labels)


@pytest.mark.parametrize("n_labels", [1, 6, 30])
def test_write_report_writes_valid_pngs(tmp_path, n_labels):
    metrics = _report_metrics(n_labels)
    json_safe(metrics)
    paths = write_report(metrics, tmp_path / "report")
    assert sorted(p.name for p in paths) == ["confusion.png", "per_class_f1.png",
                                             "risk_coverage.png"]
    for path in paths:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 300


def test_plot_risk_coverage_accepts_tuples_and_empty_curves(tmp_path):
    cov, risk = risk_coverage_curve([True, False, True], [0.9, 0.2, 0.5])
    path = plot_risk_coverage({"bilstm": (cov, risk), "empty": ([], [])}, tmp_path / "rc.png",
                              threshold_points={"0.95 target": (0.66, 0.0)})
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_report_skips_missing_sections(tmp_path):
    m = {"classification": classification_metrics([], [], LABELS)}
    assert write_report(m, tmp_path) == []


def test_format_summary_names_the_headline_numbers():
    text = format_summary(_report_metrics())
    for needle in ("token accuracy", "macro-F1", "coverage", "selective accuracy", "AURC",
                   "Top confusions", "→"):
        assert needle in text
    assert "n/a" in format_summary({"classification": classification_metrics([], [], LABELS)})
