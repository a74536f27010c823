"""k-fold hyperparameter search with Optuna, grouped by session, on train+validation.

Each trial trains one fresh model per fold (folds split sessions, never events) with early
stopping on the fold's held-out sessions and scores their macro-F1. The best trial gives the
hyperparameters, the number of epochs for the final fit on all of train+validation (the
mean of its folds' best epochs) and its out-of-fold logits, which are honest held-out
predictions for temperature scaling and the abstention threshold. The test split is never
touched here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from trainer.config import Config
from trainer.errors import ConfigError
from trainer.fit import fit_model, model_args, pick_device
from trainer.metrics import classification_metrics
from trainer.model import session_logits


def suggest(trial, cfg: Config) -> Config:
    """The search space: sizes, depth, regularisation and learning rate (the architecture
    and the lookahead are product decisions taken in the config, not searched)."""
    model = {
        "hidden_dim": trial.suggest_categorical("hidden_dim", [64, 128, 192]),
        "num_layers": trial.suggest_int("num_layers", 1, 3),
        "dropout": trial.suggest_float("dropout", 0.05, 0.4),
        "emb_event_dim": trial.suggest_categorical("emb_event_dim", [32, 64, 96]),
        "fusion": trial.suggest_categorical("fusion", ["concat", "gated"]),
    }
    if cfg.model.arch in ("transformer", "ht_transformer"):
        model["nhead"] = trial.suggest_categorical("nhead", [2, 4])
    if cfg.model.arch == "ht_transformer":
        model["history_every"] = trial.suggest_categorical("history_every", [4, 8, 16])
    train = {"lr": trial.suggest_float("lr", 5e-4, 5e-3, log=True),
             "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)}
    return cfg.replace(model=model, train=train)


def search(p, cfg: Config, *, progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    import optuna
    from sklearn.model_selection import GroupKFold

    h = cfg.train.hpo
    sessions = p.encoded["train"] + p.encoded["val"]
    groups = np.arange(len(sessions))
    k = max(2, min(h.k_folds, len(sessions)))
    folds = list(GroupKFold(n_splits=k).split(groups, groups=groups))
    device = pick_device(cfg.train.device)
    best: dict[str, Any] = {}

    def objective(trial) -> float:
        tcfg = suggest(trial, cfg)
        args = model_args(p.encoder.spec(), len(p.label_map), tcfg)
        oof: list[np.ndarray | None] = [None] * len(sessions)
        scores, epochs = [], []
        for fold, (tr, va) in enumerate(folds):
            fit = fit_model(args, [sessions[i] for i in tr], [sessions[i] for i in va], tcfg,
                            epochs=h.epochs_per_fold)
            logits = session_logits(fit.model, [sessions[i] for i in va], device)
            for i, l in zip(va, logits):
                oof[i] = l
            y = np.concatenate([sessions[i].labels for i in va])
            pred = np.concatenate(logits).argmax(-1)
            keep = y >= 0
            scores.append(classification_metrics(y[keep], pred[keep], p.label_map.labels)["macro_f1"] or 0.0)
            epochs.append(fit.best_epoch)
            trial.report(float(np.mean(scores)), fold)
            if trial.should_prune():
                raise optuna.TrialPruned()
        value = float(np.mean(scores))
        if not best or value > best["value"]:
            best.update(value=value, config=tcfg, epochs=max(1, math.ceil(float(np.mean(epochs)))),
                        oof=oof, params=dict(trial.params), fold_scores=scores)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    study.optimize(objective, n_trials=h.n_trials, timeout=h.timeout_s, show_progress_bar=progress)
    if not best:
        raise ConfigError("train.hpo: the search finished no trial (n_trials or timeout_s too small?)")
    echo(f"HPO: best mean {k}-fold macro-F1 {best['value']:.4f} with {best['params']} "
         f"({len(study.trials)} trials)")
    return {"config": best["config"], "epochs": best["epochs"], "params": best["params"],
            "cv_macro_f1": best["value"], "fold_scores": best["fold_scores"], "k_folds": k,
            "trials": len(study.trials),
            "oof_logits": best["oof"], "oof_labels": [s.labels for s in sessions]}
