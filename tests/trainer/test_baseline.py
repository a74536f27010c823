"""The classic baselines: one contract every kind passes, plus what each is for.

The synthetic log has a label that only a neighbour reveals: a ``marker`` event belongs to
``after alpha`` or ``after beta`` depending on the event before it, so a model that ignores
its neighbours cannot get it right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.baseline import BaselineLabeller, predict_labels
from trainer.config import DataConfig
from trainer.errors import ArtifactError, ConfigError, DataError
from trainer.loading import records_to_frame

KINDS = ["logreg", "crf"]
T0 = 1_717_236_160_000  # epoch ms

EVENTS = {
    "alpha": ("Read: alpha 4214758435 in Excel", "Excel"),
    "beta": ("Write: beta A226 in Chrome", "Chrome"),
    "gamma": ("Action*: C:\\Users\\me\\Desktop\\gamma.tpx in Terminal", "Terminal"),
    "marker": ("Action: marker in sharepoint", "sharepoint"),
}
OWN_LABEL = {"alpha": "alpha", "beta": "beta", "gamma": "gamma"}


def make_records(n_sessions: int, seed: int, prefix: str = "s", with_app: bool = True,
                 length: tuple[int, int] = (8, 20)) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for s in range(n_sessions):
        prev = None
        ts = T0 + s * 10_000_000
        for _ in range(rng.randint(*length)):
            if prev in ("alpha", "beta") and rng.random() < 0.5:
                kind = "marker"
            else:
                kind = rng.choice(["alpha", "beta", "gamma"])
            label = f"after {prev}" if kind == "marker" else OWN_LABEL[kind]
            name, app = EVENTS[kind]
            rec = {"session_id": f"{prefix}{s}", "timestamp": ts, "event_name": name,
                   "step_name": label}
            if with_app:
                rec["target_app"] = app
            records.append(rec)
            ts += rng.randint(1000, 9000)
            prev = kind
    return records


def frame(records):
    return records_to_frame(records, require_label=True)


@pytest.fixture(scope="module")
def train_frame():
    return frame(make_records(40, seed=1))


@pytest.fixture(scope="module")
def test_frame():
    return frame(make_records(15, seed=2, prefix="t"))


@pytest.fixture(scope="module")
def fitted(train_frame):
    return {kind: BaselineLabeller.fit(train_frame, DataConfig(), kind=kind) for kind in KINDS}


def flat_labels(frame_):
    return frame_["step_name"].to_numpy()


# ---- the contract every kind keeps -------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_are_one_row_per_event_and_sum_to_one(fitted, test_frame, kind):
    model = fitted[kind]
    assert model.kind == kind
    assert model.labels == sorted(set(flat_labels(test_frame)) | {"after alpha", "after beta"})
    probs = model.predict_proba(test_frame)
    sizes = test_frame.groupby("session_id", sort=False).size().tolist()
    assert [p.shape for p in probs] == [(n, len(model.labels)) for n in sizes]
    for p in probs:
        assert p.dtype == np.float64
        assert np.all(p >= 0)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_probabilities_without_pickle(fitted, test_frame, kind,
                                                                     tmp_path: Path):
    model = fitted[kind]
    written = model.save(tmp_path)
    assert sorted(written) == sorted(p.name for p in tmp_path.iterdir())
    for p in tmp_path.iterdir():
        assert p.suffix not in (".pkl", ".pickle", ".joblib")
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"
    manifest = json.loads((tmp_path / "baseline.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == kind and manifest["labels"] == model.labels

    loaded = BaselineLabeller.load(tmp_path)
    assert loaded.kind == kind and loaded.labels == model.labels
    for a, b in zip(model.predict_proba(test_frame), loaded.predict_proba(test_frame)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_neighbour_dependent_labels_are_learned(fitted, test_frame, kind):
    pred = np.array(predict_labels(fitted[kind], test_frame))
    gold = flat_labels(test_frame)
    markers = np.char.startswith(gold.astype(str), "after")
    assert markers.sum() > 10
    # The marker event is identical either way: only the previous event tells them apart.
    assert (pred[markers] == gold[markers]).mean() >= 0.95
    assert (pred == gold).mean() >= 0.95


def test_logreg_beats_the_majority_class_on_held_out_sessions(fitted, train_frame, test_frame):
    gold = flat_labels(test_frame)
    majority = train_frame["step_name"].value_counts().idxmax()
    baseline = (gold == majority).mean()
    acc = (np.array(predict_labels(fitted["logreg"], test_frame)) == gold).mean()
    assert baseline < 0.5
    assert acc > baseline + 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_labels_unseen_in_training_are_tolerated(fitted, kind):
    records = make_records(2, seed=3, prefix="u")
    records[0]["step_name"] = "a step nobody trained on"
    probs = fitted[kind].predict_proba(frame(records))
    assert all(p.shape[1] == len(fitted[kind].labels) for p in probs)
    assert "a step nobody trained on" not in fitted[kind].labels


@pytest.mark.parametrize("kind", KINDS)
def test_single_event_sessions_and_an_empty_frame(fitted, test_frame, kind):
    model = fitted[kind]
    one = frame(make_records(3, seed=4, prefix="one", length=(1, 1)))
    probs = model.predict_proba(one)
    assert [p.shape for p in probs] == [(1, len(model.labels))] * 3
    np.testing.assert_allclose(np.concatenate(probs).sum(axis=1), 1.0, atol=1e-9)
    assert model.predict_proba(test_frame.iloc[0:0]) == []


@pytest.mark.parametrize("kind", KINDS)
def test_optional_columns_missing_at_predict_time(fitted, kind):
    bare = frame(make_records(3, seed=5, prefix="b", with_app=False))
    assert "target_app" not in bare.columns
    probs = fitted[kind].predict_proba(bare)
    assert sum(len(p) for p in probs) == len(bare)


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_come_back_in_order_of_first_appearance(fitted, test_frame, kind):
    model = fitted[kind]
    sessions = list(dict.fromkeys(test_frame["session_id"]))
    reordered = test_frame.set_index("session_id").loc[sessions[::-1]].reset_index()
    forward = model.predict_proba(test_frame)
    backward = model.predict_proba(reordered)
    for a, b in zip(forward, backward[::-1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_fits_without_optional_columns_and_with_configured_ones(kind):
    records = make_records(12, seed=6, with_app=False)
    for i, r in enumerate(records):
        r["duration_s"] = "" if i % 7 == 0 else str(i % 5)
        r["text"] = "invoice paperwork" if r["step_name"] == "alpha" else "customer lookup"
        r["group_id"] = f"g{i % 4}"
    train = frame(records)
    data = DataConfig(cat_features=("group_id",), num_features=("duration_s",), text_features=("text",))
    model = BaselineLabeller.fit(train, data, kind=kind)
    probs = model.predict_proba(train.drop(columns=["text", "duration_s"]))
    assert sum(len(p) for p in probs) == len(train)


# ---- what a user gets wrong --------------------------------------------------------------------

def test_a_configured_column_missing_from_training_data_is_named(train_frame):
    with pytest.raises(DataError, match="duration_s"):
        BaselineLabeller.fit(train_frame, DataConfig(num_features=("duration_s",)))


def test_unknown_kind_and_hyperparameter_are_named(train_frame):
    with pytest.raises(ConfigError, match="svm"):
        BaselineLabeller.fit(train_frame, DataConfig(), kind="svm")
    with pytest.raises(ConfigError, match="c3"):
        BaselineLabeller.fit(train_frame, DataConfig(), kind="crf", c3=1.0)


def test_loading_a_folder_that_is_not_a_baseline_fails_clearly(tmp_path: Path):
    with pytest.raises(ArtifactError, match="cannot read"):
        BaselineLabeller.load(tmp_path)
    (tmp_path / "baseline.json").write_text('{"format": "something else"}')
    with pytest.raises(ArtifactError, match="not a baseline"):
        BaselineLabeller.load(tmp_path)


def test_crf_model_file_missing_fails_clearly(fitted, tmp_path: Path):
    fitted["crf"].save(tmp_path)
    (tmp_path / "crf.crfsuite").unlink()
    with pytest.raises(ArtifactError, match="crf.crfsuite"):
        BaselineLabeller.load(tmp_path)


def test_two_labels_and_one_label(train_frame):
    two = train_frame[train_frame["step_name"].isin(["alpha", "beta"])]
    model = BaselineLabeller.fit(two, DataConfig(), kind="logreg")
    assert model.labels == ["alpha", "beta"]
    pred = np.array(predict_labels(model, two))
    assert (pred == two["step_name"].to_numpy()).mean() > 0.95
    one = train_frame[train_frame["step_name"] == "gamma"]
    model = BaselineLabeller.fit(one, DataConfig(), kind="logreg")
    probs = np.concatenate(model.predict_proba(train_frame))
    assert probs.shape == (len(train_frame), 1) and np.all(probs == 1.0)


# ---- any event log, well-formed output -----------------------------------------------------------

_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                 min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions=st.lists(st.lists(_names, min_size=1, max_size=6), min_size=1, max_size=4),
       kind=st.sampled_from(KINDS))
def test_arbitrary_event_names_give_well_formed_probabilities(fitted, sessions, kind):
    records = [{"session_id": f"h{s}", "timestamp": T0 + 1000 * i, "event_name": name}
               for s, names in enumerate(sessions) for i, name in enumerate(names)]
    model = fitted[kind]
    probs = model.predict_proba(records_to_frame(records))
    assert [p.shape for p in probs] == [(len(n), len(model.labels)) for n in sessions]
    for p in probs:
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
