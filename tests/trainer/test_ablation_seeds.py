"""The seeded ablation: aggregation over seeds, the paired difference to the CRF, and that a
seeded run never touches the single-seed table. No training: job rows are made by hand."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import stdev

import pytest

from trainer import ablation as A


def row(ds: str, variant: str, f1: float, seed: int | None = None, *, acc: float = 0.5,
        aurc: float = 0.2, top1: float | None = None) -> dict:
    """A job row as ``run_job`` writes it, with only the fields the tables read."""
    r = {"dataset": ds, "variant": variant, "lookahead": 4 if top1 is not None else "offline",
         "offline": {"macro_f1": f1, "token_accuracy": acc, "aurc": aurc, "coverage": 0.0}}
    if top1 is not None:
        r["prefix"] = {"top1_accuracy": top1}
        r["streaming"] = {"final_equals_offline": 1.0}
    if seed is not None:
        r["seed"] = seed
    return r


def write_jobs(out: Path, rows: list[dict]) -> None:
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    for r in rows:
        stem = A.job_stem(r["dataset"], r["variant"], r.get("seed"))
        (out / "jobs" / f"{stem}.json").write_text(json.dumps(r))


def cell(cells: list[dict], ds: str, variant: str) -> dict:
    return next(c for c in cells if (c["dataset"], c["variant"]) == (ds, variant))


def test_mean_and_sample_sd():
    m, sd = A.mean_sd([0.5, 0.6, 0.7, None])
    assert m == pytest.approx(0.6)
    assert sd == pytest.approx(stdev([0.5, 0.6, 0.7]))  # n - 1, not n
    assert A.mean_sd([0.4]) == (0.4, None)
    assert A.mean_sd([None, None]) == (None, None)


def test_aggregate_per_cell():
    rows = [row("k", "tcn", f1, s, acc=acc, top1=t)
            for s, f1, acc, t in ((1, 0.6, 0.7, 0.5), (2, 0.7, 0.8, 0.7), (3, 0.8, 0.9, 0.6))]
    c = cell(A.aggregate(rows), "k", "tcn")
    assert c["seeds"] == [1, 2, 3]
    assert c["macro-F1"] == (pytest.approx(0.7), pytest.approx(0.1))
    assert c["token acc"][0] == pytest.approx(0.8)
    assert c["k=0 top-1 acc"][0] == pytest.approx(0.6)
    assert c["final_equals_offline"] == 1.0


def test_paired_difference_uses_the_same_seed():
    # the variant is always 0.05 above the CRF of its own seed, but below the CRF of other
    # seeds: an unpaired comparison would call it a loss on some seeds
    crf = {1: 0.50, 2: 0.70, 3: 0.60}
    rows = [row("k", "crf_baseline", f, s) for s, f in crf.items()]
    rows += [row("k", "bilstm", f + 0.05, s, top1=0.5) for s, f in crf.items()]
    rows.append(row("k", "bilstm", 0.99, 4, top1=0.5))  # no CRF on seed 4: not paired
    diffs = cell(A.aggregate(rows), "k", "bilstm")["diff_vs_crf"]
    assert list(diffs) == [1, 2, 3]
    assert list(diffs.values()) == pytest.approx([0.05, 0.05, 0.05])
    assert cell(A.aggregate(rows), "k", "crf_baseline")["diff_vs_crf"] == {}


def test_clear_lead_needs_every_seed_and_a_mean_above_the_spread():
    assert A.clear_lead([0.05, 0.06, 0.07])
    assert not A.clear_lead([0.10, 0.01, 0.02])   # wins everywhere, spread 0.09 > mean
    assert not A.clear_lead([0.10, 0.10, -0.01])  # loses once
    assert not A.clear_lead([0.10])               # one seed is no evidence


def test_render_seeds_table():
    rows = [row("k", "crf_baseline", f, s) for s, f in ((1, 0.5), (2, 0.6))]
    rows += [row("k", "tcn", f, s, top1=0.4) for s, f in ((1, 0.6), (2, 0.65))]
    rows += [row("p", "crf_baseline", 0.2, 1)]
    lines = A.render_seeds(rows, ["p", "k"]).splitlines()
    assert lines[0].startswith("| dataset | variant |")
    body = [l.split(" | ") for l in lines[2:]]
    assert [(b[0].strip("| "), b[1]) for b in body] == [("p", "crf_baseline"), ("k", "crf_baseline"),
                                                        ("k", "tcn")]
    tcn = body[2]
    assert tcn[3] == "2" and tcn[4] == f"0.625 ± {stdev([0.6, 0.65]):.3f}"
    assert tcn[9] == "+0.075 [+0.050, +0.100]" and tcn[10] == "2/2" and tcn[11] == "yes |"
    assert body[0][4] == "0.200"  # one seed: no sd


def test_seeded_outputs_never_touch_the_single_seed_doc(tmp_path):
    single = tmp_path / "ablation.md"
    single.write_text("# Ablation\n\n| table |\n\n## Findings\nhand-written\n")
    before = single.read_bytes()
    out = tmp_path / "out"
    write_jobs(out, [row("k", "crf_baseline", 0.5, 1)])
    with pytest.raises(ValueError, match="not a seeded ablation doc"):
        A.write_outputs(out, single, ["k"], "cmd", seeded=True)
    with pytest.raises(SystemExit):
        A.main(["--out", str(tmp_path / "out2"), "--doc", str(single), "--datasets", "k",
                "--seeds", "1"])
    assert single.read_bytes() == before
    assert not (tmp_path / "out2").exists()  # refused before anything was written


def test_seeded_and_single_rows_go_to_their_own_doc(tmp_path):
    out = tmp_path / "out"
    write_jobs(out, [row("kasteren", "crf_baseline", 0.5, 1), row("kasteren", "crf_baseline", 0.6, 2),
                     row("kasteren", "crf_baseline", 0.9)])
    seeds_doc, single_doc = tmp_path / "seeds.md", tmp_path / "single.md"
    A.write_outputs(out, seeds_doc, ["kasteren"], "cmd", seeded=True)
    A.write_outputs(out, single_doc, ["kasteren"], "cmd")
    seeded_text = seeds_doc.read_text()
    assert seeded_text.startswith("# Ablation over seeds\n")
    assert "seeds in the table: 1,2." in seeded_text and "0.550 ± 0.071" in seeded_text
    assert single_doc.read_text().startswith("# Ablation\n")
    assert "| kasteren | crf_baseline | offline | 0.900 |" in single_doc.read_text()
    # hand-written findings after the table survive a re-render
    seeds_doc.write_text(seeded_text + "\n## Findings\nkept\n")
    A.write_outputs(out, seeds_doc, ["kasteren"], "cmd", seeded=True)
    assert seeds_doc.read_text().endswith("## Findings\nkept\n")


def test_driver_plans_one_job_per_seed(tmp_path):
    # every planned job already has its file, so the driver only renders the doc
    out, doc = tmp_path / "out", tmp_path / "seeds.md"
    write_jobs(out, [row("kasteren", v, 0.5, s) for v in ("crf_baseline", "tcn") for s in (1, 2)])
    assert A.main(["--out", str(out), "--doc", str(doc), "--datasets", "kasteren",
                   "--variants", "crf_baseline,tcn", "--seeds", "1,2", "--workers", "1"]) == 0
    assert "| kasteren | tcn | offline | 2 |" in doc.read_text()
    assert not list((out / "jobs").glob("*.log"))  # nothing was started


def test_single_run_names_and_variants_unchanged():
    assert A.job_stem("kasteren", "bilstm") == "kasteren__bilstm"
    assert A.job_stem("kasteren", "bilstm", 3) == "kasteren__bilstm__s3"
    assert A.run_dir(Path("o"), "kasteren") == Path("o/runs/kasteren")
    assert A.parse_seeds("") is None and A.parse_seeds("1,2,3") == [1, 2, 3]
    with pytest.raises(ValueError):
        A.parse_seeds("1,1")
    for ds in ("kasteren", "placelab"):
        v = A.variants(ds)
        assert {"crf_baseline", "logreg_baseline", "bilstm", "bilstm_resample", "ht_transformer",
                "tcn", "transformer"} <= set(v)
        assert v["crf_baseline"] == {"model": {"arch": "crf"}}
        assert not any("seed" in sec for o in v.values() for sec in o.values())
    assert "bilstm_L8" in A.variants("kasteren") and "bilstm_L8" not in A.variants("placelab")
