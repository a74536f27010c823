"""The CRF ±2 reference held to a bounded horizon, on the ablation's session folds.

    python tools/bounded_reference.py LOG.csv NAME [--lags 0,1,2,4]

``tagger cv``'s CRF ±2 decodes with forward-backward marginals over the whole session, so
any later event can move an earlier label; our finals see ``model.lookahead`` (4) later
events. Decoded with a fixed lag ``d`` (``BaselineLabeller.predict_proba(decode=d)``), the
same CRF's features reach event t+d+2: lag 2 is the horizon of our finals. NAME picks the
log's base config from ``trainer.ablation.DATASETS`` (``gen``, ``wf``, ``kasteren``, ...);
folds are 5 by session with fold seed 0, as the ablation's. Prints pooled and per-fold
macro-F1 for the whole-session marginals and each lag.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from trainer.ablation import DATASETS
from trainer.baseline import BaselineLabeller
from trainer.config import from_dict
from trainer.cv import fold_frames
from trainer.evaluate import top1_scores
from trainer.loading import read_events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("name", choices=list(DATASETS))
    ap.add_argument("--lags", default="0,1,2,4")
    ap.add_argument("--folds", type=int, default=5)
    a = ap.parse_args()
    cfg = from_dict(DATASETS[a.name].base)
    frame, _ = read_events(Path(a.log), require_label=True, numeric_columns=cfg.data.num_features)
    decodes = ["marginal", *(int(x) for x in a.lags.split(","))]
    pooled = {d: ([], []) for d in decodes}
    per_fold = {d: [] for d in decodes}
    for _, train, tests in fold_frames(frame, a.folds, 0):
        ref = BaselineLabeller.fit(train, cfg.data, kind="crf", seed=cfg.train.seed)
        gold = tests["step_name"].tolist()
        for d in decodes:
            pred = [ref.labels[i] for i in np.concatenate(ref.predict_proba(tests, decode=d)).argmax(-1)]
            pooled[d][0].extend(gold)
            pooled[d][1].extend(pred)
            per_fold[d].append(top1_scores(gold, pred)["macro_f1"])
    for d in decodes:
        s = top1_scores(*pooled[d])
        print(f"CRF ±2, decode {d}: macro-F1 {s['macro_f1']:.4f}, accuracy {s['accuracy']:.4f}; "
              f"per fold {', '.join(f'{x:.4f}' for x in per_fold[d])}")


if __name__ == "__main__":
    main()
