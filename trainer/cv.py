"""``tagger cv``: cross-validation by session, the verdict for logs too small for one split.

The log's sessions are shuffled (seeded) and dealt into ``folds`` folds. For every fold and
every architecture asked for, a model is trained on the other folds through the same code
as ``tagger train`` (``train.prepare_frame`` + ``train.train_prepared``, an artifact written
and loaded back), then the fold's sessions are labelled offline (``LoadedModel.predict_proba``,
what ``predict`` does) and, for models the live worker can serve, replayed event by event
through ``LiveTagger`` (what ``evaluate --streaming`` does; the replay is passed in as
``streaming``, since ``trainer`` does not import ``stream``). Predictions are pooled over the
folds, so every session is tested exactly once, and scored together.

Two references are fit on the same folds, from the same derived features
(``trainer.baseline``):

- ``crf``: a linear-chain CRF (CRFsuite) over each event and its two neighbours on either
  side, labelled by its forward-backward marginals over the whole session (offline only);
- ``causal_crf``: the same CRF over each event and the two before it, labelled by forward
  filtering, p(y_t | events up to t): what a CRF can say when an event arrives. It is the
  yardstick for live first labels.

A third row, ``crf_at_horizon``, is the first CRF (the same fitted model) decoded by fixed-lag
smoothing so that it reads no further than a final label may: lag ``model.lookahead - 2``, its
state features reaching t + 2 beyond that (absent when the lookahead is unbounded). The
target is the whole-session CRF; this row says how much of a gap to it is the horizon, which
no streaming model with that lookahead can close.

Scores (top-1: arg-max labels, abstention ignored, as for the references):
``macro_f1`` / ``accuracy`` offline; ``coverage`` and ``selective_accuracy`` at each fold's
calibrated threshold (the precision target); ``first_top1_macro_f1`` / ``first_top1_accuracy``,
the label behind each event's first live record; ``first_coverage`` /
``first_selective_accuracy``, the share of events labelled on arrival (not abstained) and how
often those labels were right; ``edit_overhead`` and
``final_equals_offline`` from the replay. Paired per-fold differences against both
references say whether a lead holds fold by fold or only on average.

Per label: ``per_label_f1`` (pooled top-1 F1 of each label in the log) for every row, and
``label_sessions`` (each label's events and sessions). A label that only one session holds
is missing from the training folds whenever that session is tested, so no model can score
on it; ``format_labels`` names such labels, gives macro-F1 over the others, and the labels
each model gains and loses most on against the CRF ±2.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from trainer.config import Config
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.evaluate import StreamingReplay

REFERENCES = ("reference_crf", "reference_causal_crf", "reference_crf_at_horizon")
CRF, CAUSAL, HORIZON = REFERENCES
CRF_REACH = 2  # later events the CRF ±2's state features read
# the columns that name an event in ``--predictions`` (after its fold)
EVENT_COLUMNS = ("session_id", "event_id", "seq", "timestamp", "event_name", "step_name")


def horizon_lag(cfg: Config) -> Optional[int]:
    """The fixed lag at which the CRF ±2 reads as far ahead as the config's final labels
    (None: unbounded lookahead, no such reference)."""
    L = cfg.model.lookahead
    return None if L is None else max(0, L - CRF_REACH)


@dataclass
class _Pool:
    """One contender's pooled predictions (label names, frame order) and per-fold scores."""

    gold: list[str] = field(default_factory=list)
    top1: list[str] = field(default_factory=list)
    covered: list[bool] = field(default_factory=list)
    first: list[str | None] = field(default_factory=list)
    shown: list[str | None] = field(default_factory=list)    # shown on arrival, None: abstained
    stream: list[dict[str, Any]] = field(default_factory=list)   # per fold streaming block
    folds: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def session_folds(frame: pd.DataFrame, k: int, seed: int) -> list[list[str]]:
    """Sessions shuffled with ``seed`` and dealt round-robin into ``k`` folds."""
    sessions = list(pd.unique(frame["session_id"]))
    if k < 2:
        raise ConfigError(f"--folds must be at least 2, got {k}")
    if len(sessions) < k:
        raise ConfigError(f"{len(sessions)} sessions cannot make {k} folds (one session per fold at least)")
    order = np.random.default_rng(seed).permutation(len(sessions))
    return [[sessions[i] for i in order[f::k]] for f in range(k)]


def fold_frames(frame: pd.DataFrame, k: int, seed: int
                ) -> Iterator[tuple[list[str], pd.DataFrame, pd.DataFrame]]:
    """Each of ``session_folds``' folds: its test sessions, then the training and the test
    events (the other folds' and its own, each with a fresh index). The folds are drawn at
    the call, so a bad ``k`` fails there; the frames are cut one fold at a time."""
    def split(test_ids: list[str]) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
        held = frame["session_id"].isin(set(test_ids))
        return test_ids, frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
    return map(split, session_folds(frame, k, seed))


def _scores(gold: Sequence[str], pred: Sequence[str | None]) -> dict[str, Any]:
    from trainer.evaluate import top1_scores
    return top1_scores(list(gold), list(pred))


def label_sessions(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per label of the log: its events and the sessions that hold it. A label held by one
    session only is absent from every training fold when that session is tested."""
    by = frame.groupby("step_name")["session_id"]
    return {str(k): {"events": int(n), "sessions": int(m)}
            for k, n, m in zip(by.size().index, by.size().values, by.nunique().values)}


def _diffs(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"mean": None, "min": None, "max": None, "wins": 0, "folds": 0}
    return {"mean": float(np.mean(d)), "min": float(min(d)), "max": float(max(d)),
            "wins": int(sum(x > 0 for x in d)), "folds": len(d), "per_fold": [float(x) for x in d]}


def cross_validate(data: str | Path, cfg: Config, *, folds: int = 5, archs: Sequence[str] | None = None,
                   seed: int = 0, workdir: str | Path | None = None,
                   streaming: Optional["StreamingReplay"] = None,
                   variants: dict[str, dict[str, Any]] | None = None,
                   predictions: str | Path | None = None,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the cross-validation; returns the report (see the module docstring). Contenders are
    ``archs`` (each the config with ``model.arch`` set; default: the config's own) or
    ``variants``, name -> config overrides (``{"model": {"hidden_dim": 64}}``), as the
    ablation passes them. ``streaming`` (a ``trainer.evaluate.StreamingReplay``) replays each
    fold live; without it the streaming columns stay empty. ``predictions``: a CSV path for
    every event's pooled predictions (``write_predictions``)."""
    from trainer.artifacts import load_artifact
    from trainer.baseline import BaselineLabeller
    from trainer.loading import fingerprint, read_events
    from trainer.train import prepare_frame, train_prepared

    data = Path(data)
    frame, report = read_events(data, require_label=True, numeric_columns=cfg.data.num_features)
    echo(report.summary())
    if variants is None:
        variants = {a: {"model": {"arch": a}} for a in (archs or [cfg.model.arch])}
    archs = list(variants)
    configs = {name: cfg.replace(**over) if over else cfg for name, over in variants.items()}
    splits = fold_frames(frame, folds, seed)
    fp = fingerprint(data)
    clash = [a for a in archs if a in REFERENCES]
    if clash:
        raise ConfigError(f"--arch {clash[0]!r} is the name of a reference")
    lag = horizon_lag(cfg)
    refs = [r for r in REFERENCES if r != HORIZON or lag is not None]
    pools: dict[str, _Pool] = {name: _Pool() for name in refs + archs}
    tested: list[pd.DataFrame] = []                  # the test events, fold by fold
    started = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tagger-cv-")
        workdir = tmp.name
    workdir = Path(workdir)
    try:
        for f, (test_ids, train_frame, test_frame) in enumerate(splits):
            gold = test_frame["step_name"].tolist()
            if predictions is not None:
                tested.append(test_frame[list(EVENT_COLUMNS)].assign(fold=f + 1))
            echo(f"fold {f + 1}/{folds}: {len(test_ids)} test sessions ({len(test_frame)} events), "
                 f"{train_frame['session_id'].nunique()} training sessions")
            # the references, from the same derived features
            for hyper, decodes in (({}, [(CRF, "marginal")] + ([(HORIZON, lag)] if lag is not None else [])),
                                   ({"future": 0}, [(CAUSAL, "filter")])):
                t0 = time.perf_counter()
                ref = BaselineLabeller.fit(train_frame, cfg.data, kind="crf", seed=cfg.train.seed, **hyper)
                fit_s = time.perf_counter() - t0
                for name, decode in decodes:
                    t1 = time.perf_counter()
                    probs = np.concatenate(ref.predict_proba(test_frame, decode=decode))
                    top1 = [ref.labels[i] for i in probs.argmax(-1)]
                    pool = pools[name]
                    pool.gold += gold
                    pool.top1 += top1
                    pool.first += top1 if name == CAUSAL else [None] * len(top1)
                    pool.covered += [False] * len(top1)
                    pool.seconds.append(fit_s + time.perf_counter() - t1)
                    pool.folds.append(_scores(gold, top1))
            for arch in archs:
                t0 = time.perf_counter()
                acfg = configs[arch]
                p = prepare_frame(train_frame, acfg, base_dir=data.parent, fingerprint=fp, test_size=0.0)
                out = workdir / f"fold{f + 1}" / arch
                train_prepared(p, out, acfg, progress=False, echo=lambda *_: None)
                lm = load_artifact(out)
                seconds = time.perf_counter() - t0
                sids, probs, covered = lm.predict_decisions(test_frame, base_dir=data.parent)
                flat = np.concatenate(probs)
                top1 = [lm.labels[i] for i in flat.argmax(-1)]
                pool = pools[arch]
                pool.gold += gold
                pool.top1 += top1
                pool.covered += np.concatenate(covered).tolist()
                scores = _scores(gold, top1)
                block = None
                if streaming is not None and lm.kind == "neural" and lm.lookahead is not None:
                    block = streaming(lm, test_frame, offline_probs=dict(zip(sids, probs)),
                                      offline_covered=dict(zip(sids, covered)),
                                      base_dir=data.parent, per_event=True)
                    pool.first += block.pop("first_top1_labels")
                    pool.shown += block.pop("first_shown_labels")
                    pool.stream.append(block)
                    scores["first_top1_macro_f1"] = block["first_top1_macro_f1"]
                else:
                    pool.first += [None] * len(top1)
                    pool.shown += [None] * len(top1)
                pool.seconds.append(seconds)
                pool.folds.append(scores)
                echo(f"  {arch}: macro-F1 {scores['macro_f1']:.3f}"
                     + (f", first-label {block['first_top1_macro_f1']:.3f}" if block else "")
                     + f" (reference crf {pools[CRF].folds[-1]['macro_f1']:.3f}, causal crf first-label "
                     f"{pools[CAUSAL].folds[-1]['macro_f1']:.3f}); {seconds:.0f}s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = _report(data, frame, cfg, folds, seed, archs, configs, pools, time.perf_counter() - started)
    if predictions is not None:
        write_predictions(pd.concat(tested, ignore_index=True), pools, predictions)
    if lag is not None:
        report["contenders"][HORIZON]["lag"] = lag
        report["contenders"][HORIZON]["horizon"] = lag + CRF_REACH
    return report


def _report(data: Path, frame: pd.DataFrame, cfg: Config, folds: int, seed: int, archs: Sequence[str],
            configs: dict[str, Config], pools: dict[str, _Pool], seconds: float) -> dict[str, Any]:
    from trainer.evaluate import top1_metrics
    crf_f1 = [s["macro_f1"] for s in pools[CRF].folds]
    causal_f1 = [s["macro_f1"] for s in pools[CAUSAL].folds]
    horizon_f1 = [s["macro_f1"] for s in pools[HORIZON].folds] if HORIZON in pools else None
    contenders: dict[str, Any] = {}
    for name, pool in pools.items():
        offline = top1_metrics(pool.gold, pool.top1)
        row: dict[str, Any] = {"macro_f1": offline["macro_f1"], "accuracy": offline["token_accuracy"],
                               "train_seconds_per_fold": float(np.mean(pool.seconds))}
        if name in REFERENCES:
            row["kind"] = "reference"
            if name == CAUSAL:
                row["first_top1_macro_f1"], row["first_top1_accuracy"] = row["macro_f1"], row["accuracy"]
        else:
            row["kind"] = "model"
            covered = np.asarray(pool.covered, dtype=bool)
            right = np.asarray(pool.gold, dtype=object) == np.asarray(pool.top1, dtype=object)
            row["coverage"] = float(covered.mean()) if len(covered) else None
            row["selective_accuracy"] = float(right[covered].mean()) if covered.any() else None
            if pool.stream:
                first = _scores(pool.gold, pool.first)
                row["first_top1_macro_f1"] = first["macro_f1"]
                row["first_top1_accuracy"] = first["accuracy"]
                events = [b["events"] for b in pool.stream]
                for key in ("edit_overhead", "correction_time", "relative_correctness",
                            "final_equals_offline", "first_accuracy", "final_accuracy"):
                    vals = [(b.get(key), n) for b, n in zip(pool.stream, events) if b.get(key) is not None]
                    row[key] = (float(sum(v * n for v, n in vals) / sum(n for _, n in vals))
                                if vals else None)
                # how many events got a label on arrival, and how often it was right
                shown = np.asarray([x is not None for x in pool.shown])
                first_right = np.asarray(pool.gold, dtype=object) == np.asarray(pool.shown, dtype=object)
                row["first_coverage"] = float(shown.mean()) if len(shown) else None
                row["first_selective_accuracy"] = float(first_right[shown].mean()) if shown.any() else None
            f1 = [s["macro_f1"] for s in pool.folds]
            row["vs_crf"] = _diffs(f1, crf_f1)
            if horizon_f1 is not None:
                row["vs_crf_at_horizon"] = _diffs(f1, horizon_f1)
            if pool.stream:
                row["first_vs_causal_crf"] = _diffs([s.get("first_top1_macro_f1") for s in pool.folds],
                                                    causal_f1)
        # top-1 F1 of each label of the log (those macro-F1 averages over)
        row["per_label_f1"] = {lab: offline["per_class"][lab]["f1"] for lab in sorted(set(pool.gold))}
        row["per_fold"] = pool.folds
        contenders[name] = row
    return {"data": str(data), "events": int(len(frame)), "sessions": int(frame["session_id"].nunique()),
            "labels": int(frame["step_name"].nunique()), "folds": folds, "seed": seed,
            "contenders_config": {a: configs[a].to_dict() for a in archs},
            "archs": list(archs), "config": cfg.to_dict(), "seconds": round(seconds, 1),
            "label_sessions": label_sessions(frame), "contenders": contenders}


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per contender."""
    def f(x, fmt=".3f"):
        return "–" if x is None else format(x, fmt)

    def d(block):
        if not block or block.get("mean") is None:
            return "–"
        return f"{block['mean']:+.3f} [{block['min']:+.3f}, {block['max']:+.3f}] {block['wins']}/{block['folds']}"

    lines = [f"{Path(report['data']).name}: {report['events']} events, {report['sessions']} sessions, "
             f"{report['labels']} labels, {report['folds']} folds by session (seed {report['seed']})", "",
             "| model | macro-F1 | accuracy | coverage | first-label macro-F1 | first-label coverage | "
             "edit overhead | "
             "final = offline | ΔF1 vs CRF ±2 (per fold) | ΔF1 vs CRF ±2 at the same horizon | "
             "Δ first vs causal CRF | train s/fold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["contenders"].items():
        label = {CRF: "CRF ±2 (reference)", CAUSAL: "causal CRF, filtering (reference)"}.get(name, name)
        if name == HORIZON:
            label = (f"CRF ±2, fixed lag {r['lag']}: reads t+{r['horizon']}, as far as a final label "
                     "(reference)") if "lag" in r else "CRF ±2 at the finals' horizon (reference)"
        lines.append(f"| {label} | {f(r['macro_f1'])} | {f(r['accuracy'])} | {f(r.get('coverage'))} | "
                     f"{f(r.get('first_top1_macro_f1'))} | {f(r.get('first_coverage'))} | "
                     f"{f(r.get('edit_overhead'))} | "
                     f"{f(r.get('final_equals_offline'))} | {d(r.get('vs_crf'))} | "
                     f"{d(r.get('vs_crf_at_horizon'))} | "
                     f"{d(r.get('first_vs_causal_crf'))} | {r['train_seconds_per_fold']:.0f} |")
    return "\n".join(lines)


def format_labels(report: dict[str, Any], top: int = 3) -> str:
    """Lines under the table on the labels behind macro-F1: those held by one session only
    (no training fold holds them when their session is tested, so every model scores F1 0 on
    them: they cap macro-F1, and a margin over the CRF shrinks by their share), macro-F1
    over the other labels, and per model the labels it gains and loses most on against the
    CRF ±2."""
    def name(n):
        return {CRF: "CRF ±2", CAUSAL: "causal CRF", HORIZON: "CRF ±2 at the horizon"}.get(n, n)

    rows = report["contenders"]
    if not all("per_label_f1" in r for r in rows.values()):
        return ""                                   # a report written before these fields
    counts = report.get("label_sessions", {})
    lone = [lab for lab in rows[CRF]["per_label_f1"] if counts.get(lab, {}).get("sessions") == 1]
    lines = []
    if lone:
        rest = [lab for lab in rows[CRF]["per_label_f1"] if lab not in lone]
        lines.append(f"{len(lone)} of {len(rest) + len(lone)} labels occur{'s' if len(lone) == 1 else ''} "
                     "in one session only, so no training fold holds them when that session is tested: "
                     + ", ".join(f"{lab} ({counts[lab]['events']} events)" for lab in lone) + ".")
        if rest:
            lines.append(f"macro-F1 over the other {len(rest)} labels: " + ", ".join(
                f"{name(n)} {np.mean([r['per_label_f1'][lab] for lab in rest]):.3f}" for n, r in rows.items()))
    crf = rows[CRF]["per_label_f1"]
    for n, r in rows.items():
        if n in REFERENCES:
            continue
        d = sorted(((r["per_label_f1"][lab] - crf[lab], lab) for lab in crf if lab not in lone), reverse=True)
        gained = [f"{lab} {x:+.3f}" for x, lab in d[:top] if x > 0]
        lost = [f"{lab} {x:+.3f}" for x, lab in reversed(d[-top:]) if x < 0]
        if gained or lost:
            lines.append(f"{n} against the CRF ±2, per label: most gained "
                         f"{', '.join(gained) or 'none'}; most lost {', '.join(lost) or 'none'}")
    return "\n".join(lines)


def write_predictions(events: pd.DataFrame, pools: dict[str, _Pool], path: str | Path) -> None:
    """One row per event of the log (every session tested once): ``fold`` (the fold that
    tested it), the event (``EVENT_COLUMNS``), then per row of the table its top-1 label
    offline (column named as the row), and for a model also ``NAME.covered`` (kept at the
    precision target) and, when replayed live, ``NAME.first`` (the label behind its first
    record) and ``NAME.shown`` (the label that record showed; empty where it abstained)."""
    table = events[["fold", *EVENT_COLUMNS]].copy()
    for name, pool in pools.items():
        table[name] = pool.top1
        if name not in REFERENCES:
            table[f"{name}.covered"] = pool.covered
            if pool.stream:
                table[f"{name}.first"] = pool.first
                table[f"{name}.shown"] = pool.shown
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from trainer.artifacts import json_default
    path.write_text(json.dumps(report, indent=2, default=json_default), encoding="utf-8")


__all__ = ["cross_validate", "fold_frames", "format_labels", "format_table", "horizon_lag", "label_sessions", "session_folds",
           "write_predictions", "write_report", "REFERENCES"]
