"""Fitting one model: seeding, the device, chunking long sessions, class weights, and the
epoch loop with early stopping (``fit_model``), or CRFsuite for ``model.arch: crf``
(``fit_any``). The pipeline around it (validation plans, calibration, the artifact) is
``trainer.train``; the hyperparameter search (``trainer.hpo``) fits through here too.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.config import Config, ModelConfig
from trainer.crf import fit_crf
from trainer.errors import ConfigError
from trainer.features import UNK, EncodedSession
from trainer.model import IGNORE, Tagger, collate


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def chunk_sessions(sessions: Sequence[EncodedSession], chunk_len: int, context: int,
                   lookahead: int | None) -> list[EncodedSession]:
    """Cut long sessions into overlapping chunks; every event is trained on exactly once, in
    the chunk where it has its full history (``context``) and future (``lookahead``)."""
    L = lookahead if lookahead is not None else 16
    chunk_len = max(chunk_len, context + L + 32)
    stride = chunk_len - context - L
    out = []
    for s in sessions:
        n = len(s)
        if n <= chunk_len:
            out.append(s)
            continue
        start = 0
        while True:
            stop = min(n, start + chunk_len)
            part = s.rows(start, stop)
            part.labels = part.labels.copy()
            if start > 0:
                part.labels[:context] = IGNORE
            if stop < n:
                part.labels[len(part) - L:] = IGNORE
            out.append(part)
            if stop >= n:
                break
            start += stride
    return out


def label_counts(sessions: Sequence[EncodedSession], n_labels: int) -> np.ndarray:
    """How many labelled events each step has in ``sessions``."""
    counts = np.zeros(n_labels)
    for s in sessions:
        lab = s.labels[s.labels != IGNORE]
        counts += np.bincount(lab, minlength=n_labels)[:n_labels]
    return counts


def class_weights(sessions: Sequence[EncodedSession], n_labels: int) -> torch.Tensor:
    """Inverse square-root frequency, mean 1: rare steps count more without drowning the rest."""
    counts = label_counts(sessions, n_labels)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    w = w / w[counts > 0].mean() if (counts > 0).any() else np.ones(n_labels)
    return torch.tensor(w, dtype=torch.float32)


def model_args(spec: dict[str, Any], n_labels: int, cfg: Config, *, read_clock: bool = False) -> ModelConfig:
    """The network's constructor arguments: the config's model section sized for the data
    (a fitted ``FeatureEncoder.spec()`` and the label count). ``read_clock``: the model reads
    the time of day that ``data.time_of_day: auto`` derives (auto's ``crf_clock``)."""
    return cfg.model.sized(spec, n_labels, image_backbone=backbone_path(cfg) if spec["image_size"] else None,
                           freeze_backbone=cfg.data.freeze_backbone, read_clock=read_clock)


def backbone_path(cfg: Config) -> str | None:
    """``data.image_backbone`` as an absolute path to an existing local file (or None)."""
    path = cfg.data.image_backbone
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"data.image_backbone: no such file {path!r} (backbones are local files, "
                          f"never downloaded)")
    return str(p)


@dataclass
class FitResult:
    model: Tagger
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fit_model(args: ModelConfig, train: Sequence[EncodedSession], val: Sequence[EncodedSession],
              cfg: Config, *, epochs: int | None = None, progress: bool = False,
              desc: str = "train", stop_after: int | None = None) -> FitResult:
    """Train one model; early stopping on validation loss when ``val`` is given, otherwise a
    fixed number of epochs. Returns the best (or last) weights. ``stop_after``: stop after
    that many epochs of the full schedule (the epoch that early stopping chose on held-out
    folds, for the final fit on all training sessions)."""
    t = cfg.train
    set_seed(t.seed)
    device = pick_device(t.device)
    chunks = chunk_sessions(train, cfg.data.chunk_len, args.context, args.lookahead)
    weights = class_weights(train, args.n_labels) if t.class_weights else None
    model = Tagger(args, weights, loss=t.loss, focal_gamma=t.focal_gamma,
                   label_smoothing=t.label_smoothing).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    n_epochs = epochs or t.epochs
    # few, long sessions (a day each) make few chunks: cap the batch so that an epoch still
    # takes at least min_steps_per_epoch optimiser steps
    batch_size = max(1, min(t.batch_size, math.ceil(len(chunks) / max(1, t.min_steps_per_epoch))))
    steps_per_epoch = math.ceil(len(chunks) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=max(1, n_epochs * steps_per_epoch),
                                                pct_start=0.1)
    rng = np.random.default_rng(t.seed)
    sample_p = _chunk_sampling(chunks, args.n_labels) if t.resample else None
    val_chunks = chunk_sessions(val, 4096, args.context, args.lookahead) if val else []
    # every visible depth k = 0..L, so that what the worker shows on arrival is trained too
    depths = args.lookahead if t.depth_training and args.lookahead else None
    best, best_epoch, best_loss, bad = None, 0, float("inf"), 0
    history = []
    start = time.perf_counter()
    bar = _bar(n_epochs, desc, progress)
    for epoch in range(1, n_epochs + 1):
        model.train()
        # batches of similar length waste less padding; shuffled order within and across
        if sample_p is not None:
            order = rng.choice(len(chunks), size=len(chunks), replace=True, p=sample_p)
        else:
            order = rng.permutation(len(chunks))
        order = sorted(order, key=lambda i: (len(chunks[i]) // 16, rng.random()))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        total, count = 0.0, 0
        for idx in batches:
            batch, tgt = collate([chunks[i] for i in idx], device, with_targets=True)
            if depths is not None:
                batch["horizon"] = sample_horizons(tgt.shape, depths, rng).to(device)
            if t.feature_dropout > 0:
                drop_features(batch, t.feature_dropout, rng)
            _, loss = model(batch, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        row = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if val_chunks:
            row.update(_val_scores(model, val_chunks, device))
            if row["val_loss"] < best_loss - 1e-4:
                best_loss, best_epoch, bad = row["val_loss"], epoch, 0
                best = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        else:
            best_epoch, best = epoch, None
        history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
        if val_chunks and bad >= t.patience:
            break
        if stop_after is not None and epoch >= stop_after:
            break
    if bar is not None:
        bar.close()
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return FitResult(model, best_epoch, history, time.perf_counter() - start)


def drop_features(batch: dict[str, torch.Tensor], p: float, rng: np.random.Generator) -> None:
    """``train.feature_dropout``: in place, each lexical id of the batch becomes padding and
    each template id unseen (UNK), each with probability ``p``."""
    lex = batch["lex"]
    if lex.numel():
        batch["lex"] = lex.masked_fill(torch.from_numpy(rng.random(tuple(lex.shape)) < p).to(lex.device), 0)
    ev = batch["event"]
    gone = torch.from_numpy(rng.random(tuple(ev.shape)) < p).to(ev.device) & (ev > UNK)
    batch["event"] = ev.masked_fill(gone, UNK)


def sample_horizons(shape: tuple[int, int], L: int, rng: np.random.Generator) -> torch.Tensor:
    """A visible depth per position: L (the final label) half the time, else uniform over
    0..L-1 (the labels shown before it). (B, T) long."""
    k = rng.integers(0, L, size=shape)
    k[rng.random(shape) < 0.5] = L
    return torch.from_numpy(k)


def fit_any(args: ModelConfig, train: Sequence[EncodedSession], val: Sequence[EncodedSession], cfg: Config,
            *, progress: bool = False, desc: str = "train", stop_after: int | None = None) -> FitResult:
    """``fit_model`` for the networks, CRFsuite (``trainer.crf``) for ``arch: crf``."""
    if args.arch == "crf":
        model, info = fit_crf(args, train, c1=cfg.model.crf_c1, c2=cfg.model.crf_c2)
        return FitResult(model, 0, [], info["seconds"])
    return fit_model(args, train, val, cfg, progress=progress, desc=desc, stop_after=stop_after)


def _chunk_sampling(chunks: Sequence[EncodedSession], n_labels: int) -> np.ndarray:
    """Resampling for imbalance: a chunk's draw probability is the mean inverse-sqrt
    frequency of its labels, so chunks holding rare steps come up more often."""
    w = class_weights(chunks, n_labels).numpy()
    score = np.array([w[c.labels[c.labels != IGNORE]].mean() if (c.labels != IGNORE).any() else 0.0
                      for c in chunks])
    if score.sum() <= 0:
        return np.full(len(chunks), 1.0 / len(chunks))
    return score / score.sum()


def _val_scores(model: Tagger, chunks: Sequence[EncodedSession], device: str) -> dict[str, float]:
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for k in range(0, len(chunks), 32):
            batch, tgt = collate(chunks[k:k + 32], device, with_targets=True)
            logits, _ = model(batch, None)
            keep = tgt != IGNORE
            # unweighted NLL: the early-stopping signal should not depend on class weights
            loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            correct += int((logits.argmax(-1)[keep] == tgt[keep]).sum())
            n += int(keep.sum())
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1)}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # imported only when a bar is shown
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)
