"""The ablation: every model variant on generated logs and on the real logs, one table.

    python -m trainer.ablation --out results/ablation [--data-dir ../shared/data]
                               [--datasets gen,kasteren] [--variants bilstm,crf] [--workers 2]
    python -m trainer.ablation --seeds 1,2,3 --out results/ablation_seeds --doc docs/ablation_seeds.md

For each (dataset, variant) job it trains with ``trainer.train.train`` on the training file
(``data.test_size: 0``, so the fixed test file is the test), then scores the test file with
``trainer.evaluate.evaluate(..., streaming=True)``: offline metrics, and the streaming replay
through the live tagging loop. For streamable models it also replays the test sessions
through ``Tagger.step`` to score the labels shown *before* they are final (visible-future
depth k = 0) under the full-lookahead calibration and under the prefix-time calibration.

Each finished job is a JSON file under ``OUT/jobs``; a rerun skips finished jobs, so the run
can be stopped and resumed. After every job the table is re-rendered from all job files into
``OUT/ablation.json`` and ``--doc`` (default ``docs/ablation.md``), so a partial run still
leaves a partial table. Jobs run in ``--workers`` processes with one torch thread each (on a
small shared machine, one thread per process is several times faster than two).

Generated logs are written by ``tagger generate`` under ``OUT/data`` when missing. Real logs
are read in place and never copied.

With ``--seeds`` every job runs once per seed with ``train.seed`` set; the seed drives the
weight initialisation, the batch order and the train/validation session split (the test file
is fixed), so each seed is one draw of everything that varies between reruns. Job files are
``DATASET__VARIANT__sSEED.json`` and the doc is a table of mean ± sd over seeds with the
per-seed difference to the CRF baseline (``render_seeds``). The two kinds of doc carry
different titles and a run refuses to rewrite a doc of the other kind, so a seeded run can
never replace the single-seed table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# ---- datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    name: str
    train: str
    test: str
    base: dict[str, Any] = field(default_factory=dict)      # config sections for every variant
    note: str = ""


def datasets(out: Path, data_dir: Path) -> dict[str, Dataset]:
    gen = out / "data"
    small = {"model": {"hidden_dim": 64, "lookahead": 4},
             "train": {"epochs": 60, "patience": 12, "lr": 3e-3, "batch_size": 8},
             "data": {"min_freq": 1, "val_size": 0.2}}
    return {
        "gen": Dataset("gen", str(gen / "gen.train.csv"), str(gen / "gen.test.csv"),
                       {"train": {"epochs": 6}}, "tagger generate: 1000 sessions seed 1 / 300 seed 2"),
        "genimg": Dataset("genimg", str(gen / "genimg.train.csv"), str(gen / "genimg.test.csv"),
                          {"train": {"epochs": 6}}, "tagger generate --images: 800 seed 11 / 300 seed 12"),
        "rebmann_l1": Dataset("rebmann_l1", str(data_dir / "rebmann_l1.train.csv"),
                              str(data_dir / "rebmann_l1.test.csv"),
                              {"train": {"epochs": 25, "patience": 6, "batch_size": 8},
                               "data": {"val_size": 0.15}}),
        "rebmann_l2": Dataset("rebmann_l2", str(data_dir / "rebmann_l2.train.csv"),
                              str(data_dir / "rebmann_l2.test.csv"),
                              {"train": {"epochs": 25, "patience": 6, "batch_size": 8},
                               "data": {"val_size": 0.15}}),
        "kasteren": Dataset("kasteren", str(data_dir / "kasteren.train.csv"),
                            str(data_dir / "kasteren.test.csv"), small),
        "placelab": Dataset("placelab", str(data_dir / "placelab.train.csv"),
                            str(data_dir / "placelab.test.csv"), small),
    }


GENERATE = {"gen.train.csv": (1000, 1, None), "gen.test.csv": (300, 2, None),
            "genimg.train.csv": (800, 11, "img_train"), "genimg.test.csv": (300, 12, "img_test")}

# ---- variants ------------------------------------------------------------------------------

ARCHS = ["bilstm", "transformer", "tcn", "bilstm_attn", "ht_transformer"]


def variants(ds: str) -> dict[str, dict[str, Any]]:
    """Variant name -> config overrides, per dataset: what is worth measuring where, cut to
    what a small shared machine finishes in about an hour (see the ablation doc)."""
    v: dict[str, dict[str, Any]] = {"crf_baseline": {"model": {"arch": "crf"}}}
    if ds == "genimg":
        img = {"image_col": "screenshot_path"}
        return {
            "bilstm_no_image": {},
            "bilstm_image": {"data": img},
            "bilstm_image_late": {"data": img, "model": {"fusion": "late"}},
            "bilstm_image_backbone": {"data": {**img, "image_backbone": "@backbone"}},
        }
    if ds in ("kasteren", "placelab"):
        v["logreg_baseline"] = {"model": {"arch": "logreg"}}
    if ds.startswith("rebmann"):  # near-trivial sanity checks: the baseline, two archs, text
        return {**v, "bilstm": {}, "ht_transformer": {"model": {"arch": "ht_transformer"}},
                "bilstm_text": {"data": {"text_features": ["text"]}}}
    for a in ARCHS:
        if ds in ("kasteren", "gen") or a != "bilstm_attn":
            v[a] = {"model": {"arch": a}}
    v["bilstm_crf"] = {"model": {"crf": True}}
    if ds != "gen":
        v["ht_transformer_crf"] = {"model": {"arch": "ht_transformer", "crf": True}}
    if ds in ("gen", "kasteren", "placelab"):
        v["bilstm_focal"] = {"train": {"loss": "focal"}}
        v["bilstm_resample"] = {"train": {"resample": True}}
    if ds == "kasteren":
        v["bilstm_no_class_weights"] = {"train": {"class_weights": False}}
    if ds == "gen":
        v["bilstm_text"] = {"data": {"text_features": ["text"], "event_name_text": True}}
        v["group_id_only"] = {"data": {"feature_set": "group_id_only"}}
    if ds == "kasteren":  # the lookahead sweep, for the seed's BiLSTM and for the HT-Transformer
        for L in (0, 1, 2, 8, None):
            v[f"bilstm_L{'inf' if L is None else L}"] = {"model": {"lookahead": L}}
    if ds in ("gen", "kasteren"):
        for L in ((0, 1, 2, 8, None) if ds == "kasteren" else (0, 2, 8, None)):
            v[f"ht_transformer_L{'inf' if L is None else L}"] = {"model": {"arch": "ht_transformer",
                                                                           "lookahead": L}}
    return v


Job = tuple[str, str, int | None]  # dataset, variant, seed (None: the single run)


def job_stem(dataset: str, variant: str, seed: int | None = None) -> str:
    """A job's file name without suffix; the single-seed names predate ``--seeds`` and stay."""
    return f"{dataset}__{variant}" if seed is None else f"{dataset}__{variant}__s{seed}"


def run_dir(out: Path, dataset: str, seed: int | None = None) -> Path:
    """Where a dataset's model folders go: one folder per seed, so seeds never share one."""
    return out / "runs" / dataset / ("" if seed is None else f"s{seed}")


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for sec, vals in p.items():
            out[sec] = {**out.get(sec, {}), **vals}
    return out


# ---- one job -------------------------------------------------------------------------------

def run_job(ds: Dataset, name: str, overrides: dict[str, Any], out: Path,
            seed: int | None = None) -> dict[str, Any]:
    import torch

    from trainer.artifacts import load_artifact
    from trainer.config import from_dict
    from trainer.evaluate import evaluate
    torch.set_num_threads(1)
    sections = _merge({"data": {"test_size": 0.0}}, ds.base, overrides,
                      {} if seed is None else {"train": {"seed": seed}})
    if sections.get("data", {}).get("image_backbone") == "@backbone":
        sections["data"]["image_backbone"] = str(export_backbone(out, ds.name, seed))
    cfg = from_dict(sections)
    model_dir = run_dir(out, ds.name, seed) / name
    t0 = time.perf_counter()
    from trainer.train import train
    metrics = train(ds.train, model_dir, cfg, progress=False, echo=lambda s: None)
    train_wall = time.perf_counter() - t0
    lm = load_artifact(model_dir)
    streamable = lm.kind == "neural" and lm.lookahead is not None
    t1 = time.perf_counter()
    res = evaluate(model_dir, ds.test, None, streaming=streamable, plots=False)
    eval_wall = time.perf_counter() - t1
    row: dict[str, Any] = {
        "dataset": ds.name, "variant": name, "config": sections,
        "events": res["events"], "sessions": res["sessions"], "offline": res["offline"],
        "precision_at_threshold": res["offline"]["selective_accuracy"],
        "train_seconds": metrics.get("train_seconds"), "train_wall_seconds": round(train_wall, 1),
        "eval_wall_seconds": round(eval_wall, 1),
        "lookahead": lm.lookahead if lm.kind == "neural" else "offline",
    }
    if seed is not None:  # single-seed rows keep their old shape
        row["seed"] = seed
    if streamable:
        st = res["streaming"]
        row["streaming"] = {k: st.get(k) for k in ("first_accuracy", "final_accuracy", "edit_overhead",
                                                   "correction_time", "relative_correctness",
                                                   "final_equals_offline", "us_per_event")}
        # offline inference time per event: the streaming replay is one step per event
        row["us_per_event"] = st.get("us_per_event")
        row["prefix"] = _prefix_scores(lm, ds)
    else:
        # the baselines label whole sessions; time one offline pass per event
        row["us_per_event"] = round(1e6 * eval_wall / max(res["events"], 1), 1)
    return row


def _prefix_scores(lm, ds: Dataset) -> dict[str, Any]:
    """Labels shown at visible-future depth k = 0 (the first emission) on the test set:
    precision and coverage under the full-lookahead calibration and the prefix one."""
    from trainer.artifacts import softmax_t
    from trainer.loading import read_events
    from trainer.train import prefix_logits
    frame, _ = read_events(ds.test, require_label=True, numeric_columns=lm.encoder.data.num_features)
    from trainer.features import LabelMap  # test steps the model never saw get -100: wrong
    _, enc = lm.encoder.transform_frame(frame, LabelMap(lm.labels), base_dir=Path(ds.test).parent)
    z, y = prefix_logits(lm.model, enc, "cpu")
    keep = y[0] != -100
    out: dict[str, Any] = {"top1_accuracy": float((z[0].argmax(-1) == y[0]).mean()) if len(y[0]) else None,
                           "n": int(keep.sum())}
    for tag, temp, thr in (("global", lm.temperature, lm.threshold),
                           ("prefix", lm.prefix_temperatures[0], lm.prefix_threshold(0))):
        p = softmax_t(z[0], temp)
        cov = p.max(-1) >= thr
        ok = p.argmax(-1) == y[0]
        out[tag] = {"threshold": float(thr), "coverage": float(cov.mean()),
                    "precision": float(ok[cov].mean()) if cov.any() else None}
    return out


def export_backbone(out: Path, ds: str, seed: int | None = None) -> Path:
    """The screenshot backbone for the ``image_backbone`` variant: the SmallCNN trained by the
    ``bilstm_image`` variant on the same training split and seed, exported as TorchScript (a
    stand-in for a pretrained backbone file; nothing is downloaded here)."""
    import torch

    from trainer.artifacts import load_artifact
    from trainer.model import _Scaled
    path = out / "backbones" / f"{ds}{'' if seed is None else f'_s{seed}'}_smallcnn.pt"
    if path.exists():
        return path
    src = run_dir(out, ds, seed) / "bilstm_image"
    if not (src / "manifest.json").exists():
        raise RuntimeError(f"run the bilstm_image variant on {ds} before bilstm_image_backbone")
    lm = load_artifact(src)
    cnn = lm.model.embed.image
    size = lm.model.args.image_size
    path.parent.mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(_Scaled(cnn).eval(), torch.zeros(1, 3, size, size))
    traced.save(str(path))
    return path


# ---- the table -----------------------------------------------------------------------------

def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


COLUMNS = ("dataset | variant | L | macro-F1 | token acc | cov@0.95 | prec@thr | AURC | "
           "first acc | final acc | edit ovh | k=0 top-1 acc | k=0 prec/cov (global) | k=0 prec/cov (prefix) | "
           "µs/event | train s")


def render(rows: list[dict[str, Any]], order: list[str]) -> str:
    lines = ["| " + COLUMNS + " |", "|" + "---|" * len(COLUMNS.split("|"))]
    key = {d: i for i, d in enumerate(order)}
    for r in sorted(rows, key=lambda r: (key.get(r["dataset"], 99), r["variant"])):
        o, s, p = r["offline"], r.get("streaming") or {}, r.get("prefix") or {}

        def pc(tag):
            b = p.get(tag)
            return "–" if not b else f"{_f(b['precision'], 2)}/{_f(b['coverage'], 2)}"
        L = r.get("lookahead")
        lines.append("| " + " | ".join([
            r["dataset"], r["variant"], "∞" if L is None else str(L), _f(o["macro_f1"]),
            _f(o["token_accuracy"]), _f(o["coverage"]), _f(r.get("precision_at_threshold")),
            _f(o["aurc"], 4), _f(s.get("first_accuracy")), _f(s.get("final_accuracy")),
            _f(s.get("edit_overhead")), _f(p.get("top1_accuracy")), pc("global"), pc("prefix"), _f(r.get("us_per_event"), 0),
            _f(r.get("train_seconds"), 0)]) + " |")
    return "\n".join(lines)


HEADER = """# Ablation

Generated by `{cmd}` (see `trainer/ablation.py`). Machine: 2 CPU cores shared with other
work, one torch thread per job, 2 jobs at a time; times are wall-clock under that load and
only comparable within this table.

Columns: offline metrics on the fixed test file (`macro-F1`, `token acc`; `cov@0.95` is the
share of test events labelled at the threshold chosen on validation sessions for precision
>= 0.95 with 90% confidence (Clopper-Pearson, fixed-sequence), `prec@thr` the precision
actually reached on test at that threshold; `AURC` the area under the risk-coverage curve,
lower is better); streaming replay through the live tagging loop (`first acc` / `final acc`:
first and final emitted label, abstentions count as wrong; `edit ovh`: edit overhead); `k=0
prec/cov`: the label shown when an event arrives (no later event visible), precision/coverage
with the full-lookahead calibration vs the prefix-time calibration, and `k=0 top-1 acc` the accuracy of that first label without abstention; `µs/event`: live step
time per event (baselines: offline time per event); `train s`: fitting time. `L` is the
lookahead (∞ = unbounded, offline only; baselines see the whole session).

"""


SEEDS_HEADER = """# Ablation over seeds

Generated by `{cmd}` (see `trainer/ablation.py`); seeds in the table: {seeds}. Machine: 2 CPU
cores shared with other work; one torch thread per job.

Each cell is the mean ± sample sd over seeds (`n`). A seed sets `train.seed`: weight
initialisation, batch order and the train/validation session split of the training file
(validation picks the early-stopping epoch and the calibration); the test file is fixed, so
the CRF baseline also changes with the seed, through its training sessions. `ΔF1 vs CRF` is
the per-seed macro-F1 minus the CRF baseline's on the same seed, as mean [min, max];
`wins` counts the seeds where it is above 0; `lead` is `yes` when it wins on every seed (at
least two) and the mean difference is larger than its range (max - min). `k=0 top-1 acc`:
the label shown when an event arrives (no later event visible), without abstention.
`final = offline`: share of test events whose final live label (at the calibrated
threshold) equals the offline one; where it is 1, the final live top-1 accuracy is the
offline `token acc`, so it is not repeated. `–`: not defined (baselines are offline only;
sd of one seed).

"""

SEED_COLUMNS = ("dataset | variant | L | n | macro-F1 | token acc | AURC | k=0 top-1 acc | "
                "final = offline | ΔF1 vs CRF | wins | lead")

# (column, value from one job row, decimals)
SEED_METRICS: tuple[tuple[str, Any, int], ...] = (
    ("macro-F1", lambda r: r["offline"]["macro_f1"], 3),
    ("token acc", lambda r: r["offline"]["token_accuracy"], 3),
    ("AURC", lambda r: r["offline"]["aurc"], 4),
    ("k=0 top-1 acc", lambda r: (r.get("prefix") or {}).get("top1_accuracy"), 3),
)

BASELINE = "crf_baseline"


def mean_sd(xs: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (n - 1) of the defined values; sd is None below two values."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None
    return mean(vals), (stdev(vals) if len(vals) > 1 else None)


def paired_diffs(rows: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Macro-F1 minus the baseline's, seed by seed: only seeds both have, since a seed fixes
    the validation split and the two are compared on equal terms only within one seed."""
    return {s: rows[s]["offline"]["macro_f1"] - base[s]["offline"]["macro_f1"]
            for s in sorted(rows.keys() & base.keys())}


def clear_lead(diffs: list[float]) -> bool:
    """A lead beyond seed noise: above the baseline on every seed (two or more) and a mean
    difference larger than the range of the differences."""
    return len(diffs) >= 2 and min(diffs) > 0 and mean(diffs) > max(diffs) - min(diffs)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (dataset, variant) over the seeded job rows."""
    cells: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["variant"]), {})[r["seed"]] = r
    out = []
    for (ds, v), by_seed in cells.items():
        seeds = sorted(by_seed)
        diffs = paired_diffs(by_seed, cells.get((ds, BASELINE), {})) if v != BASELINE else {}
        out.append({
            "dataset": ds, "variant": v, "seeds": seeds,
            "lookahead": by_seed[seeds[0]].get("lookahead"),
            **{name: mean_sd([get(by_seed[s]) for s in seeds]) for name, get, _ in SEED_METRICS},
            "final_equals_offline": mean_sd([(by_seed[s].get("streaming") or {}).get("final_equals_offline")
                                             for s in seeds])[0],
            "diff_vs_crf": diffs,
        })
    return out


def _pm(ms: tuple[float | None, float | None], nd: int) -> str:
    m, sd = ms
    return _f(m, nd) if sd is None else f"{_f(m, nd)} ± {_f(sd, nd)}"


def render_seeds(rows: list[dict[str, Any]], order: list[str]) -> str:
    """The seeded table: mean ± sd per metric and the paired macro-F1 difference to the CRF."""
    lines = ["| " + SEED_COLUMNS + " |", "|" + "---|" * len(SEED_COLUMNS.split("|"))]
    key = {d: i for i, d in enumerate(order)}
    for c in sorted(aggregate(rows), key=lambda c: (key.get(c["dataset"], 99), c["variant"])):
        d = list(c["diff_vs_crf"].values())
        diff = f"{mean(d):+.3f} [{min(d):+.3f}, {max(d):+.3f}]" if d else "–"
        L = c["lookahead"]
        lines.append("| " + " | ".join([
            c["dataset"], c["variant"], "∞" if L is None else str(L), str(len(c["seeds"])),
            *[_pm(c[name], nd) for name, _, nd in SEED_METRICS], _f(c["final_equals_offline"]),
            diff, f"{sum(x > 0 for x in d)}/{len(d)}" if d else "–",
            ("yes" if clear_lead(d) else "no") if d else "–"]) + " |")
    return "\n".join(lines)


def check_doc(doc: Path, seeded: bool) -> None:
    """Refuse to rewrite a doc of the other kind, told apart by its title line: a seeded run
    pointed at the single-seed doc (or the reverse) would replace its table."""
    title = (SEEDS_HEADER if seeded else HEADER).split("\n", 1)[0]
    if doc.exists():
        first = doc.read_text().split("\n", 1)[0]
        if first != title:
            raise ValueError(f"{doc} starts with {first!r}, not {title!r}: not a "
                             f"{'seeded' if seeded else 'single-seed'} ablation doc; pass another --doc")


def write_outputs(out: Path, doc: Path, order: list[str], cmd: str, extra: str = "",
                  seeded: bool = False) -> None:
    check_doc(doc, seeded)
    rows = []
    for f in sorted((out / "jobs").glob("*.json")):
        try:
            rows.append(json.loads(f.read_text()))
        except ValueError:
            continue
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    failed = sorted(p.stem for p in (out / "jobs").glob("*.failed"))
    scored = [r for r in rows if "offline" in r and ("seed" in r) == seeded]
    if seeded:
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in scored})) or "none yet"
        text = SEEDS_HEADER.format(cmd=cmd, seeds=seeds) + render_seeds(scored, order) + "\n"
    else:
        text = HEADER.format(cmd=cmd) + render(scored, order) + "\n"
    if failed:
        text += "\nFailed jobs (see OUT/jobs/*.failed): " + ", ".join(failed) + "\n"
    if extra:
        text += "\n" + extra
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".md.tmp")
    keep = ""
    if doc.exists():  # keep hand-written sections after the table
        old = doc.read_text()
        i = old.find("\n## ")
        keep = old[i:] if i >= 0 else ""
    tmp.write_text(text + keep)
    os.replace(tmp, doc)


# ---- driver --------------------------------------------------------------------------------

def ensure_generated(out: Path, needed: set[str]) -> None:
    gen = out / "data"
    gen.mkdir(parents=True, exist_ok=True)
    from trainer.generate import generate
    for name, (n, seed, images) in GENERATE.items():
        if name.split(".")[0] in needed and not (gen / name).exists():
            generate(n, seed, gen / name, images_dir=gen / images if images else None)


def parse_seeds(text: str) -> list[int] | None:
    """``--seeds 1,2,3`` -> [1, 2, 3]; empty -> None, the single run at the config's seed."""
    seeds = [int(x) for x in text.split(",") if x.strip()]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {text}")
    return seeds or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="default results/ablation (with --seeds: results/ablation_seeds)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--doc", help="default docs/ablation.md (with --seeds: docs/ablation_seeds.md)")
    ap.add_argument("--datasets", default="gen,kasteren,placelab,rebmann_l1,rebmann_l2,genimg")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--seeds", default="", help="comma-separated train.seed values, one run each "
                                                "(default: one run at the config's seed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--job", help=argparse.SUPPRESS)       # internal: DATASET/VARIANT[/SEED]
    a = ap.parse_args(argv)
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError as exc:
        ap.error(str(exc))
    seeded = seeds is not None
    out = Path(a.out or ("results/ablation_seeds" if seeded else "results/ablation"))
    doc = Path(a.doc or ROOT / "docs" / ("ablation_seeds.md" if seeded else "ablation.md"))
    if not a.job:
        try:
            check_doc(doc, seeded)  # before anything is written or trained
        except ValueError as exc:
            ap.error(str(exc))
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    all_ds = datasets(out, Path(a.data_dir))
    order = [d for d in a.datasets.split(",") if d]
    if a.job:
        dname, vname, *s = a.job.split("/")
        seed = int(s[0]) if s else None
        ds = all_ds[dname]
        stem = job_stem(dname, vname, seed)
        if vname not in variants(dname):  # dropped from the plan since the driver started
            print(f"skipped {a.job}: no longer a variant of {dname}")
            return 0
        try:
            row = run_job(ds, vname, variants(dname)[vname], out, seed)
        except Exception:
            (out / "jobs" / f"{stem}.failed").write_text(traceback.format_exc())
            raise
        (out / "jobs" / f"{stem}.json").write_text(json.dumps(row, indent=1))
        return 0
    ensure_generated(out, {d for d in order if d.startswith("gen")})
    wanted = set(filter(None, a.variants.split(",")))
    jobs = [(d, v, s) for d in order for v in variants(d) if not wanted or v in wanted
            for s in (seeds or [None])]
    todo = [j for j in jobs if not (out / "jobs" / f"{job_stem(*j)}.json").exists()]
    cmd = "python -m trainer.ablation --out " + str(out) + (f" --datasets {a.datasets}")
    if seeded:
        cmd += (f" --variants {a.variants}" if a.variants else "") + f" --seeds {a.seeds} --doc {doc}"
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # a backbone job needs its image job first: keep each dataset's jobs in order per worker
    queue = list(todo)
    while queue or running:
        while queue and len(running) < a.workers:
            job = _next(queue, running)
            if job is None:
                break
            name = "/".join(str(x) for x in job if x is not None)
            args = [sys.executable, "-m", "trainer.ablation", "--out", str(out), "--data-dir", a.data_dir,
                    "--job", name]
            log = open(out / "jobs" / f"{job_stem(*job)}.log", "w")
            running.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), name))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"finished {name} (exit {proc.returncode})", flush=True)
                write_outputs(out, doc, order, cmd, seeded=seeded)
    write_outputs(out, doc, order, cmd, seeded=seeded)
    return 0


def _next(queue: list[Job], running) -> Job | None:
    busy = {name for _, name in running}
    for i, (d, v, s) in enumerate(queue):
        image = "/".join(str(x) for x in (d, "bilstm_image", s) if x is not None)
        if v == "bilstm_image_backbone" and (image in busy or (d, "bilstm_image", s) in queue):
            continue
        return queue.pop(i)
    return None


if __name__ == "__main__":
    sys.exit(main())
