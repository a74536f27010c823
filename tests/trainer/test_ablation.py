"""The ablation driver over ``tagger cv``: one report per log, resumed variant by variant,
one table per log in the doc, hand-written sections kept."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.trainer.test_baseline import make_records
from tests.trainer.test_cv import TINY
from tagger.cli import streaming_replay
from trainer import ablation as A
from trainer.config import from_dict
from trainer.cv import REFERENCES


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A real log ``tiny`` in a data folder, with the tiny model settings as its base config."""
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(make_records(8, seed=5)).to_csv(data / "tiny.csv", index=False)
    monkeypatch.setitem(A.DATASETS, "tiny", A.Dataset(TINY))
    return data


def test_reports_per_log_resume_and_doc(tiny, tmp_path, monkeypatch):
    out, doc = tmp_path / "out", tmp_path / "ablation.md"
    doc.write_text("# Ablation\n\nan old table\n\n## Findings\nhand-written\n")
    calls = []

    def spy(data, cfg, **kw):
        calls.append(list(kw["variants"]))
        return real(data, cfg, **kw)
    real = A.cross_validate
    monkeypatch.setattr(A, "cross_validate", spy)

    def run(variants):
        lines = []
        args = ["--datasets", "tiny", "--variants", variants, "--folds", "2", "--seed", "3",
                "--out", str(out), "--doc", str(doc), "--data-dir", str(tiny)]
        assert A.main(args, echo=lines.append, streaming=streaming_replay) == 0
        return lines

    run("crf")
    report = json.loads((out / "tiny.json").read_text())
    assert list(report["contenders"]) == [*REFERENCES, "crf"]
    assert report["folds"] == 2 and report["seed"] == 3 and report["sessions"] == 8
    assert report["contenders"]["crf"]["vs_crf"]["folds"] == 2
    text = doc.read_text()
    assert text.startswith("# Ablation\n") and "an old table" not in text
    assert "python -m tagger.ablation --datasets tiny --variants crf --folds 2 --seed 3" in text
    assert "tiny.csv: " in text and "2 folds by session (seed 3)" in text
    assert "| CRF ±2 (reference) |" in text and "| crf |" in text
    assert text.endswith("\n## Findings\nhand-written\n")

    # everything asked for is stored: nothing is trained again
    assert any("skipped" in line for line in run("crf")) and calls == [["crf"]]

    # a new variant is cross-validated alone and joins the stored rows
    run("crf,default")
    assert calls == [["crf"], ["default"]]
    merged = json.loads((out / "tiny.json").read_text())
    assert list(merged["contenders"]) == [*REFERENCES, "crf", "default"]
    assert merged["contenders"]["crf"] == report["contenders"]["crf"]
    default = merged["contenders"]["default"]
    assert default["vs_crf"]["per_fold"] == pytest.approx(
        [a["macro_f1"] - b["macro_f1"] for a, b in
         zip(default["per_fold"], merged["contenders"]["reference_crf"]["per_fold"])])
    assert "| default |" in doc.read_text() and doc.read_text().count("tiny.csv: ") == 1


def test_merge_refuses_other_references():
    def report(f1s):
        ref = {"per_fold": [{"macro_f1": f, "accuracy": f} for f in f1s]}
        return {"contenders": {r: ref for r in REFERENCES}, "contenders_config": {}, "seconds": 1.0}
    assert A.merge(report([0.5, 0.6]), report([0.5, 0.6]), []) is not None
    assert A.merge(report([0.5, 0.6]), report([0.5, 0.7]), []) is None


def test_every_variant_is_a_valid_config_on_every_log():
    for d in A.DATASETS.values():
        base = from_dict(d.base)
        for over in A.VARIANTS.values():
            base.replace(**over)
    assert A.VARIANTS["default"] == {}


def test_bad_names_fail_before_anything_runs(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert A.main(["--datasets", "tiny", "--variants", "crf,nope", "--out", str(out)]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert A.main(["--datasets", "kasteren", "--out", str(out), "--data-dir", str(tmp_path)]) == 2
    assert "kasteren.csv" in capsys.readouterr().err
    assert not out.exists()


def test_generated_logs_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setitem(A.DATASETS, "g", A.Dataset(generate={"sessions": 3, "seed": 1}))
    path = A.ensure_log("g", tmp_path, tmp_path / "unused", echo=lambda *_: None)
    assert path == tmp_path / "data" / "g.csv"
    first = path.read_bytes()
    assert pd.read_csv(path)["session_id"].nunique() == 3
    assert A.ensure_log("g", tmp_path, tmp_path, echo=lambda *_: None).read_bytes() == first
    assert A.load_report(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"contenders": {')
    assert A.load_report(tmp_path / "half.json") is None
