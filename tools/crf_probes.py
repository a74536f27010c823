"""Cheap probes of a feature or penalty idea on the CRF references, before building it into a model.

    python tools/crf_probes.py LOG.csv NAME clusters [--k 16,64]
    python tools/crf_probes.py LOG.csv NAME penalties [--grid 0.05/1.0,0.2/0.05]
    python tools/crf_probes.py LOG.csv NAME stack [--windows 8,32]
    python tools/crf_probes.py LOG.csv NAME buckets
    python tools/crf_probes.py LOG.csv NAME neighbours [--k 10]

Each probe refits ``tagger cv``'s two references (the CRF ±2, whole-session marginals, and
the causal CRF, forward filtering) with one change, on the ablation's folds (5 by session,
fold seed 0, the log's base config from ``trainer.ablation.DATASETS``), and prints pooled
macro-F1 and the paired per-fold difference against the unchanged reference:

- ``clusters``: the k-means cluster (k of ``--k``, fit on the training sessions' distinct
  texts) of each event's text embedding (the packaged all-MiniLM-L6-v2; the configured text
  columns, else the event name) as a categorical column: words a title shares with no
  training title, mapped to titles that mean the same.
- ``penalties``: CRFsuite's L1/L2 penalties (``c1/c2``; the references use 0.05/0.05).
- ``stack``: a two-stage CRF. The causal CRF's filtered label distributions (out of fold on
  the training sessions, 4 inner folds) are summed over the ``w`` events before each event;
  the top label of that sum is a categorical column (``ctx{w}``): the activity the recent
  past was in, beyond the ±2 window.
- ``buckets``: the pause since the session's previous event and each numeric column in
  powers of two, as categorical columns.
- ``neighbours``: the labels of the training titles nearest each event's title (cosine of
  the same embeddings; titles from the event's own session left out on the training
  sessions, so that a training day does not vote for itself): ``nn`` the top label of the
  ``k`` nearest titles' label counts, weighed by similarity; ``same`` the top label of the
  identical title on other days (``none`` for a title no other day had).

A probe that does not lift the references on several logs is not worth a model change;
docs/ablation.md records the ones run.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from trainer.ablation import DATASETS
from trainer.baseline import BaselineLabeller
from trainer.config import DataConfig, from_dict
from trainer.cv import fold_frames, session_folds
from trainer.evaluate import top1_scores
from trainer.loading import read_events

REFERENCES = (("CRF ±2", {}, "marginal"), ("causal CRF", {"future": 0}, "filter"))
# A change: (train frame, test frame, data config) -> the same three, changed. Each probe's
# variants are name -> (change, CRFsuite hyper-parameters for both references)
Change = Callable[[pd.DataFrame, pd.DataFrame, DataConfig], tuple[pd.DataFrame, pd.DataFrame, DataConfig]]


def with_columns(data: DataConfig, names: list[str]) -> DataConfig:
    return dataclasses.replace(data, cat_features=tuple(data.cat_features) + tuple(names))


def texts(frame: pd.DataFrame, data: DataConfig) -> pd.Series:
    """What an event's embedding is of: its configured text columns, else its name."""
    cols = list(data.text_features) or ["event_name"]
    return frame[cols].fillna("").astype(str).agg(" | ".join, axis=1)


def clusters(ks: list[int]) -> dict[str, tuple[Change, dict]]:
    from sklearn.cluster import KMeans
    from trainer.features import default_text_embedder

    def change(k_list: list[int]) -> Change:
        def apply(train, test, data):
            tr, te = texts(train, data), texts(test, data)
            known = sorted(set(tr))
            every = sorted(set(tr) | set(te))
            emb = dict(zip(every, default_text_embedder().embed(every)))
            out_tr, out_te = {}, {}
            for k in k_list:
                km = KMeans(n_clusters=min(k, len(known)), n_init=3, random_state=0)
                km.fit(np.stack([emb[t] for t in known]))
                ids = dict(zip(every, km.predict(np.stack([emb[t] for t in every])).tolist()))
                out_tr[f"emb{k}"] = tr.map(ids).astype(str)
                out_te[f"emb{k}"] = te.map(ids).astype(str)
            return train.assign(**out_tr), test.assign(**out_te), with_columns(data, list(out_tr))
        return apply

    out = {f"k={k}": (change([k]), {}) for k in ks}
    if len(ks) > 1:
        out["k=" + "+".join(map(str, ks))] = (change(ks), {})
    return out


def penalties(grid: list[tuple[float, float]]) -> dict[str, tuple[Change, dict]]:
    same: Change = lambda train, test, data: (train, test, data)    # noqa: E731
    return {f"c1={c1}, c2={c2}": (same, {"c1": c1, "c2": c2}) for c1, c2 in grid}


def stack(windows: list[int]) -> dict[str, tuple[Change, dict]]:
    def filtered(train: pd.DataFrame, test: pd.DataFrame, data: DataConfig, labels: list[str]) -> np.ndarray:
        m = BaselineLabeller.fit(train, data, kind="crf", future=0)
        out = np.zeros((len(test), len(labels)))
        out[:, [labels.index(x) for x in m.labels]] = np.concatenate(m.predict_proba(test, decode="filter"))
        return out

    def context(frame: pd.DataFrame, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
        cols: dict[str, list[str]] = {f"ctx{w}": [] for w in windows}
        start = 0
        for _, g in frame.groupby("session_id", sort=False):      # the order predict_proba keeps
            c = np.vstack([np.zeros((1, probs.shape[1])), np.cumsum(probs[start:start + len(g)], 0)])
            start += len(g)
            for w in windows:
                cols[f"ctx{w}"] += ["none"] + [labels[int((c[t] - c[max(0, t - w)]).argmax())]
                                               for t in range(1, len(g))]
        return frame.assign(**cols)

    def apply(train, test, data):
        labels = sorted(train["step_name"].astype(str).unique())
        oof = np.zeros((len(train), len(labels)))
        for inner in session_folds(train, 4, 1):
            held = train["session_id"].isin(set(inner)).to_numpy()
            oof[held] = filtered(train[~held].reset_index(drop=True), train[held].reset_index(drop=True),
                                 data, labels)
        return (context(train, oof, labels), context(test, filtered(train, test, data, labels), labels),
                with_columns(data, [f"ctx{w}" for w in windows]))

    return {"ctx" + "+".join(map(str, windows)): (apply, {})}


def neighbours(k: int) -> dict[str, tuple[Change, dict]]:
    from trainer.features import default_text_embedder

    def apply(train, test, data):
        tr, te = texts(train, data), texts(test, data)
        labels = sorted(train["step_name"].astype(str).unique())
        known = sorted(set(tr))
        tid = {t: i for i, t in enumerate(known)}
        sessions = sorted(train["session_id"].astype(str).unique())
        sid = {s: i for i, s in enumerate(sessions)}
        lid = {x: i for i, x in enumerate(labels)}
        # label counts per (session, title)
        counts = np.zeros((len(sessions), len(known), len(labels)))
        np.add.at(counts, (train["session_id"].astype(str).map(sid).to_numpy(), tr.map(tid).to_numpy(),
                           train["step_name"].astype(str).map(lid).to_numpy()), 1.0)
        total = counts.sum(0)
        every = sorted(set(tr) | set(te))
        emb = dict(zip(every, default_text_embedder().embed(every)))
        bank = np.stack([emb[t] for t in known])
        bank /= np.linalg.norm(bank, axis=1, keepdims=True) + 1e-9

        def columns(frame: pd.DataFrame, text: pd.Series, own: bool) -> pd.DataFrame:
            nn, same = [], []
            keys = list(zip(frame["session_id"].astype(str), text)) if own else [(None, t) for t in text]
            memo: dict = {}
            for key in keys:
                if key not in memo:
                    s, t = key
                    c = total - counts[sid[s]] if own else total          # other days' counts
                    q = emb[t] / (np.linalg.norm(emb[t]) + 1e-9)
                    sim = bank @ q
                    seen = c.sum(1) > 0
                    sim = np.where(seen, sim, -np.inf)
                    top = np.argsort(-sim)[:k]
                    top = top[np.isfinite(sim[top])]
                    vote = (sim[top, None] * (c[top] / c[top].sum(1, keepdims=True))).sum(0)
                    j = tid.get(t)
                    memo[key] = (labels[int(vote.argmax())] if len(top) else "none",
                                 labels[int(c[j].argmax())] if j is not None and c[j].sum() > 0 else "none")
                nn.append(memo[key][0])
                same.append(memo[key][1])
            return frame.assign(nn=nn, same=same)

        return columns(train, tr, True), columns(test, te, False), with_columns(data, ["nn", "same"])

    return {f"neighbours k={k}": (apply, {})}


def buckets(num_features: list[str]) -> dict[str, tuple[Change, dict]]:
    def bins(x: pd.Series) -> pd.Series:
        v = pd.to_numeric(x, errors="coerce")
        return np.floor(np.log2(1.0 + v.clip(lower=0.0))).map(lambda b: "nan" if np.isnan(b) else str(int(b)))

    def columns(frame: pd.DataFrame) -> pd.DataFrame:
        gap = frame.groupby("session_id", sort=False)["_ts"].diff().fillna(0.0)
        return frame.assign(gap_bin=bins(gap), **{f"{c}_bin": bins(frame[c]) for c in num_features})

    def apply(train, test, data):
        return columns(train), columns(test), with_columns(data, ["gap_bin", *(f"{c}_bin" for c in num_features)])

    return {"log2 buckets": (apply, {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("name", choices=list(DATASETS))
    ap.add_argument("probe", choices=["clusters", "penalties", "stack", "buckets", "neighbours"])
    ap.add_argument("--k", default=None, help="clusters: cluster counts (16,64); neighbours: titles (10)")
    ap.add_argument("--grid", default="0.05/0.01,0.05/0.3,0.05/1.0,0.2/0.05",
                    help="penalties: c1/c2 pairs")
    ap.add_argument("--windows", default="8,32", help="stack: past events summed")
    ap.add_argument("--folds", type=int, default=5)
    a = ap.parse_args()
    cfg = from_dict(DATASETS[a.name].base)
    frame, _ = read_events(Path(a.log), require_label=True, numeric_columns=cfg.data.num_features)
    if a.probe == "clusters":
        changes = clusters([int(x) for x in (a.k or "16,64").split(",")])
    elif a.probe == "neighbours":
        changes = neighbours(int(a.k or 10))
    elif a.probe == "penalties":
        changes = penalties([tuple(float(v) for v in g.split("/")) for g in a.grid.split(",")])
    elif a.probe == "stack":
        changes = stack([int(x) for x in a.windows.split(",")])
    else:
        changes = buckets(list(cfg.data.num_features))
    names = ["unchanged", *changes]
    gold_all: list[str] = []
    pooled = {(n, r): [] for n in names for r, _, _ in REFERENCES}
    per_fold = {(n, r): [] for n in names for r, _, _ in REFERENCES}
    for f, (_, train, test) in enumerate(fold_frames(frame, a.folds, 0)):
        gold = test["step_name"].astype(str).tolist()
        gold_all += gold
        for n in names:
            tr, te, data = (train, test, cfg.data) if n == "unchanged" else changes[n][0](train, test, cfg.data)
            extra = {} if n == "unchanged" else changes[n][1]
            for r, hyper, decode in REFERENCES:
                ref = BaselineLabeller.fit(tr, data, kind="crf", seed=cfg.train.seed, **hyper, **extra)
                pred = [ref.labels[i] for i in np.concatenate(ref.predict_proba(te, decode=decode)).argmax(-1)]
                pooled[n, r] += pred
                per_fold[n, r].append(top1_scores(gold, pred)["macro_f1"])
        print(f"fold {f + 1}/{a.folds} done", flush=True)
    for r, _, _ in REFERENCES:
        for n in names:
            d = np.array(per_fold[n, r]) - np.array(per_fold["unchanged", r])
            print(f"{a.name} {r}, {n}: macro-F1 {top1_scores(gold_all, pooled[n, r])['macro_f1']:.3f}"
                  + ("" if n == "unchanged" else
                     f"; per fold {d.mean():+.3f} [{d.min():+.3f}, {d.max():+.3f}], {(d > 0).sum()}/{len(d)} up"))


if __name__ == "__main__":
    main()
