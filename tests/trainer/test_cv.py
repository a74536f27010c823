"""``tagger cv``: folds by session, every session tested once, pooled scores and paired
per-fold differences against the two CRF references; ``model.arch: auto``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.trainer.test_baseline import make_records
from tagger.cli import main, streaming_replay
from trainer.config import from_dict
from trainer.baseline import BaselineLabeller
from trainer.cv import REFERENCES, cross_validate, format_table, horizon_lag, session_folds
from trainer.evaluate import top1_scores
from trainer.errors import ConfigError
from trainer.loading import read_events

# ``auto`` without the default's ``bilstm_causal`` (see tests/helpers.py: one network less per fit)
TINY = {"model": {"hidden_dim": 16, "emb_event_dim": 16, "num_layers": 1, "lookahead": 2, "context": 16,
                  "lex_dim": 16, "auto_archs": ["bilstm", "crf", "crf_ahead"]},
        "train": {"epochs": 4, "patience": 2, "batch_size": 8, "val_folds": 2}}


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv") / "log.csv"
    pd.DataFrame(make_records(12, seed=5)).to_csv(path, index=False)
    return path


def test_folds_split_sessions_and_cover_each_once(log):
    frame, _ = read_events(log)
    folds = session_folds(frame, 4, seed=0)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == sorted(frame["session_id"].unique()) and len(flat) == len(set(flat))
    assert session_folds(frame, 4, seed=0) == folds and session_folds(frame, 4, seed=1) != folds
    with pytest.raises(ConfigError, match="12 sessions cannot make 20 folds"):
        session_folds(frame, 20, seed=0)


def test_cross_validation_pools_every_event_and_compares_per_fold(log, tmp_path):
    report = cross_validate(log, from_dict(TINY), folds=3, archs=["crf", "bilstm"], echo=lambda *_: None,
                            streaming=streaming_replay, predictions=tmp_path / "events.csv")
    frame, _ = read_events(log)
    assert report["events"] == len(frame) and report["sessions"] == 12 and report["folds"] == 3
    rows = report["contenders"]
    assert set(rows) == set(REFERENCES) | {"crf", "bilstm"}
    for name in ("crf", "bilstm"):
        r = rows[name]
        assert len(r["per_fold"]) == 3 and r["vs_crf"]["folds"] == 3
        assert r["vs_crf"]["per_fold"] == pytest.approx(
            [a["macro_f1"] - b["macro_f1"] for a, b in zip(r["per_fold"], rows["reference_crf"]["per_fold"])])
        assert r["final_equals_offline"] == 1.0               # both are served live
        assert 0 <= r["edit_overhead"] <= 1 and r["first_top1_macro_f1"] is not None
        # the first live labels, event by event, are the ones the first-label scores came from
        table = pd.read_csv(tmp_path / "events.csv", dtype=str, keep_default_na=False)
        assert top1_scores(table["step_name"].tolist(), table[f"{name}.first"].tolist())["macro_f1"] == \
            pytest.approx(r["first_top1_macro_f1"])
        # what each event showed on arrival: its first top-1 label, or nothing (abstained);
        # the first-label coverage and precision are those events'
        shown = table[f"{name}.shown"] != ""
        assert (table.loc[shown, f"{name}.shown"] == table.loc[shown, f"{name}.first"]).all()
        assert r["first_coverage"] == pytest.approx(shown.mean())
        if shown.any():
            assert r["first_selective_accuracy"] == pytest.approx(
                (table.loc[shown, f"{name}.shown"] == table.loc[shown, "step_name"]).mean())
    # the marker's label is its predecessor's: a causal CRF knows it on arrival
    assert rows["crf"]["first_top1_accuracy"] > 0.9
    # the CRF ±2 held to the finals' horizon (lookahead 2: lag 0, reading t+2), on the same
    # folds: what the same CRF decoded with that lag scores, and every model compared with it
    horizon = rows["reference_crf_at_horizon"]
    assert (horizon["lag"], horizon["horizon"]) == (0, 2)
    want = []
    for test in session_folds(frame, 3, seed=0):
        held = frame["session_id"].isin(set(test))
        ref = BaselineLabeller.fit(frame[~held].reset_index(drop=True), from_dict(TINY).data, kind="crf",
                                   seed=from_dict(TINY).train.seed)
        tests = frame[held].reset_index(drop=True)
        pred = [ref.labels[i] for i in np.concatenate(ref.predict_proba(tests, decode=0)).argmax(-1)]
        want.append(top1_scores(tests["step_name"].tolist(), pred)["macro_f1"])
    assert [f["macro_f1"] for f in horizon["per_fold"]] == pytest.approx(want)
    assert rows["bilstm"]["vs_crf_at_horizon"]["per_fold"] == pytest.approx(
        [a["macro_f1"] - b for a, b in zip(rows["bilstm"]["per_fold"], want)])
    table = format_table(report)
    assert "CRF ±2 (reference)" in table and "| bilstm |" in table
    assert "CRF ±2, fixed lag 0: reads t+2, as far as a final label (reference)" in table


def test_a_label_only_one_session_holds_is_named_and_macro_f1_is_given_without_it(tmp_path, capsys):
    # one session's "gamma" events get a step of their own: whichever fold tests that
    # session, no training fold holds the step, so every model scores F1 0 on it
    records = make_records(12, seed=5)
    lone = [r for r in records if r["session_id"] == "s3" and r["step_name"] == "gamma"]
    assert lone
    for r in lone:
        r["step_name"] = "Once a year"
    path = tmp_path / "log.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    out, preds = tmp_path / "cv.json", tmp_path / "preds" / "events.csv"
    assert main(["-q", "cv", "--data", str(path), "--json", str(out), "--folds", "3", "--arch", "crf",
                 "--no-streaming", "--predictions", str(preds)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["label_sessions"]["Once a year"] == {"events": len(lone), "sessions": 1}
    assert report["label_sessions"]["gamma"]["sessions"] > 1
    n = len({r["step_name"] for r in records})
    rows = report["contenders"]
    rest = [lab for lab in rows["reference_crf"]["per_label_f1"] if lab != "Once a year"]
    for name, row in rows.items():
        per_label = row["per_label_f1"]
        assert per_label["Once a year"] == 0.0, name
        # macro-F1 is the mean of the per-label F1 over the labels of the log
        assert np.mean(list(per_label.values())) == pytest.approx(row["macro_f1"]), name
    assert (f"1 of {n} labels occurs in one session only, so no training fold holds them when that session "
            f"is tested: Once a year ({len(lone)} events).") in printed
    without = {n: np.mean([r["per_label_f1"][lab] for lab in rest]) for n, r in rows.items()}
    assert (f"macro-F1 over the other {n - 1} labels: CRF ±2 {without['reference_crf']:.3f}, "
            f"causal CRF {without['reference_causal_crf']:.3f}") in printed
    assert f"crf {without['crf']:.3f}" in printed
    assert without["crf"] > rows["crf"]["macro_f1"]

    # --predictions: every event once, the fold that tested it, and each row's labels, from
    # which its scores come back
    table = pd.read_csv(preds, dtype=str, keep_default_na=False)
    frame, _ = read_events(path)
    assert len(table) == len(frame) and not table.duplicated(["session_id", "seq"]).any()
    assert (table.groupby("session_id")["fold"].nunique() == 1).all()
    assert sorted(table["fold"].unique()) == ["1", "2", "3"]
    assert set(table.columns) >= {"session_id", "event_id", "seq", "timestamp", "event_name", "step_name",
                                  *REFERENCES, "crf", "crf.covered"}
    for name, row in rows.items():
        scores = top1_scores(table["step_name"].tolist(), table[name].tolist())
        assert scores["macro_f1"] == pytest.approx(row["macro_f1"]), name
        assert scores["accuracy"] == pytest.approx(row["accuracy"]), name
    # the step can still be predicted elsewhere (its session trained the other folds' models),
    # never where it is: no training fold held it when its session was tested
    once = table["step_name"] == "Once a year"
    assert not (table.loc[once, list(rows)] == "Once a year").any().any()
    covered = table["crf.covered"] == "True"
    assert covered.mean() == pytest.approx(rows["crf"]["coverage"])


def test_horizon_reference_follows_the_lookahead():
    assert horizon_lag(from_dict({})) == from_dict({}).model.lookahead - 2
    assert horizon_lag(from_dict({"model": {"lookahead": 1}})) == 0
    assert horizon_lag(from_dict({"model": {"lookahead": None}})) is None


def test_cv_command_writes_json_and_table(log, tmp_path, capsys):
    out = tmp_path / "cv.json"
    assert main(["-q", "cv", "--data", str(log), "--json", str(out), "--folds", "2", "--arch", "crf"]) == 0
    report = json.loads(out.read_text())
    assert set(report["contenders"]) == set(REFERENCES) | {"crf"}
    assert "| crf |" in capsys.readouterr().out
    assert main(["-q", "cv", "--data", str(log), "--json", str(out), "--folds", "30"]) == 2
    assert "cannot make 30 folds" in capsys.readouterr().err
    # an output that cannot be written is refused before anything is trained, not after
    assert main(["-q", "cv", "--data", str(log), "--json", str(tmp_path), "--arch", "crf"]) == 2
    assert f"tagger cv: error: --json {tmp_path}: is a folder; name a file" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["-q", "cv", "--data", str(log), "--json", str(out), "--arch", "crf",
                 "--predictions", str(blocker / "events.csv")]) == 2
    err = capsys.readouterr()
    assert (f"tagger cv: error: --predictions {blocker / 'events.csv'}: {blocker} is a file, so no folder "
            "can be made there") in err.err
    assert "fold 1/" not in err.out + err.err


def test_auto_combines_the_candidates_per_depth_and_serves_the_result(log, tmp_path):
    from trainer.artifacts import load_artifact
    from trainer.evaluate import evaluate
    from trainer.train import train
    cfg = from_dict({**TINY, "model": {**TINY["model"], "arch": "auto", "auto_archs": ["bilstm", "crf"]}})
    lines = []
    metrics = train(log, tmp_path / "m", cfg, progress=False, echo=lines.append)
    auto = metrics["auto"]
    # data.time_of_day auto (the default): crf_clock too, when alone it beats crf on held-out sessions
    assert set(auto["candidates"]) == {"bilstm", "crf"} | ({"crf_clock"} if auto["clock"]["kept"] else set())
    assert [r["k"] for r in auto["depths"]] == [0, 1, 2]
    for r in auto["depths"]:
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        # one model alone is on the grid too, so the choice is never worse on held-out data
        assert r["macro_f1"] >= max(a["macro_f1"] for a in r["alone"].values()) - 1e-12
    used = [a for a in auto["candidates"] if any(r["weights"][a] > 0 for r in auto["depths"])]
    assert auto["members"] == used
    lm = load_artifact(tmp_path / "m")
    if len(used) == 1:
        assert auto["chosen"] == used[0] and lm.model.args.arch == used[0]
    else:
        assert auto["chosen"] == "mixture" and lm.model.args.arch == "mixture"
        assert [m.args.arch for m in lm.model.members] == used
    assert any(line.strip().startswith("-> ") for line in lines)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["auto"]["chosen"] == auto["chosen"]
    res = evaluate(tmp_path / "m", log, streaming=streaming_replay, plots=False)
    assert res["streaming"]["final_equals_offline"] == 1.0
