"""The ablation: ``tagger cv`` (``trainer.cv.cross_validate``) over each log and model variant.

    python -m tagger.ablation --datasets kasteren,placelab,rebmann_l1,rebmann_l2,wf
                               [--variants default,crf,bilstm,...] [--folds 5] [--seed 0]
                               [--out results/ablation] [--doc docs/ablation.md]
                               [--data-dir ../shared/data]

Every variant of a log is cross-validated on the same session folds as the two CRF
references, so each row carries its paired per-fold differences to them. The logs
(``DATASETS``) are the real ones, whole, read in place from ``--data-dir`` (``NAME.csv``, not
the ``.train``/``.test`` splits), and generated ones written under ``OUT/data`` when missing.
A variant (``VARIANTS``) is config overrides on the log's base config; ``default`` has none,
so it follows whatever the config defaults are, and the feature and training switches are
applied to those defaults too.

Each log's report is ``OUT/NAME.json`` (``trainer.cv.write_report``). A rerun skips a log whose
report already holds every requested variant with the same folds, seed and config, and
cross-validates only the variants it lacks, merged into the stored report (the references
are refit on the same folds and must come out the same). So a long run can be stopped and
resumed, losing at most the log in progress. After each log, ``--doc`` is re-rendered from
every report under ``OUT``: a header, then one ``trainer.cv.format_table`` per log; anything
in the old doc from its first ``## `` heading on is hand-written and kept.

One process, one torch thread: the machine this runs on has two shared cores. The command
is ``python -m tagger.ablation``, which passes ``main`` the live replay (``streaming``) for
each fold's first-label scores; ``trainer`` does not import ``stream``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from trainer.config import Config, from_dict
from trainer.cv import REFERENCES, cross_validate, format_labels, format_table, write_report
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.evaluate import StreamingReplay

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Dataset:
    """A log: read from ``--data-dir`` or, with ``generate`` (``trainer.generate.generate``
    keyword arguments), written under ``OUT/data``; ``base``: the config every variant of it
    starts from (the columns it has beyond the four required ones)."""

    base: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] | None = None


TEXT = {"data": {"text_features": ["text"]}}
DATASETS: dict[str, Dataset] = {
    "kasteren": Dataset(),
    "placelab": Dataset(),
    "rebmann_l1": Dataset(TEXT),
    "rebmann_l2": Dataset(TEXT),
    # tagger generate --profile window-focus --sessions 20 --seed 1
    "wf": Dataset({"data": {"text_features": ["text"], "num_features": ["duration_s"]}},
                  {"profile": "window-focus", "sessions": 20, "seed": 1}),
    # tagger generate --profile window-focus-hard --seed 2: titles that say less (CRF +-2 ~0.43)
    "wf_hard": Dataset({"data": {"text_features": ["text"], "num_features": ["duration_s"]}},
                       {"profile": "window-focus-hard", "sessions": 20, "seed": 2}),
    # tagger generate --profile window-focus --sessions 20 --seed 3 (and 4): the profile on
    # days no setting was developed on, for checking that a gain on wf is not wf's alone
    **{f"wf_s{s}": Dataset({"data": {"text_features": ["text"], "num_features": ["duration_s"]}},
                           {"profile": "window-focus", "sessions": 20, "seed": s}) for s in (3, 4)},
    # tagger generate --sessions 300 --seed 1
    "gen": Dataset(generate={"sessions": 300, "seed": 1}),
}

ARCHS = ("bilstm", "transformer", "tcn", "bilstm_attn", "ht_transformer", "crf", "logreg", "auto")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    **{a: {"model": {"arch": a}} for a in ARCHS},
    "no_lexical": {"data": {"lexical": False}},                 # no sparse n-gram features
    "no_wide": {"model": {"wide": False}},                      # no linear path over t-2..t+2
    "no_depth_training": {"train": {"depth_training": False}},  # full-lookahead training only
    "split_validation": {"train": {"validation": "split"}},     # one split, not session folds
    "no_elapsed_time": {"data": {"elapsed_time": False}},       # no time since the session start
    "day_parts": {"data": {"time_of_day": True}},               # the four-hour part of the day as a feature
    "time_of_day": {"data": {"time_of_day": True, "time_of_day_hour": True}},   # and the hour
    # the part of the day read by one more auto candidate alone (crf_clock), weighed per log
    "clock_auto": {"data": {"time_of_day": "auto"}},
    "no_clock": {"data": {"time_of_day": False}},
    "num_clip5": {"data": {"num_clip": 5.0}},                   # standardised numbers clipped to +-5
    "no_char_ngrams": {"data": {"char_ngrams": False}},         # lexical: words and bigrams only
    "crf_char_ngrams": {"model": {"crf_char_ngrams": True}},     # the CRF member reads the 4-grams too
    "merged_text_words": {"data": {"lex_by_column": False}},   # text columns' words = the name's (before 2026-12-05)
    "no_prior_bias": {"train": {"auto_prior_taus": [0.0]}},      # auto adds no label bias (before 2026-12-05)
    "bagged": {"train": {"auto_bags": 32}},                     # auto's weights: mean best over 32 session bootstraps
    "edit_final": {"train": {"edit_overhead_final": True}},      # final labels withheld to keep edit overhead
    "events_bound": {"train": {"guarantee_over": "events"}},    # precision bound over events, not sessions (before 2026-12-07)
    "past4": {"model": {"wide_past": 4}},                       # the CRF and wide path read t-4 .. t
    "seeds2": {"train": {"ensemble_seeds": 2}},                 # each network twice, averaged
    "seeds3": {"train": {"ensemble_seeds": 3}},
    # the networks and the CRF members alike reading 5 (6, 8) later events: network_lookahead
    # is null as the default was when these were measured (it is 4 since the 28th session)
    "lookahead5": {"model": {"lookahead": 5, "network_lookahead": None}},
    "lookahead6": {"model": {"lookahead": 6, "network_lookahead": None}},
    "lookahead4": {"model": {"lookahead": 4, "network_lookahead": None}},   # the default before the 28th session
    # finals after 6 later events, the network reading 4 of them (the CRF members smooth over 6)
    "crf_lag6": {"model": {"lookahead": 6, "network_lookahead": 4}},
    # finals after 16 later events, the network reading 4 of them: the CRF members' fixed-lag
    # smoothing reaches as far as whole-session marginals do on the window-focus logs' runs
    # (the default's config since the 28th session; kept under the name it was measured by)
    "crf_lag16": {"model": {"lookahead": 16, "network_lookahead": 4}},
    # finals after 8 later events, the network reading 4: half the default's smoothing lag
    "crf_lag8": {"model": {"lookahead": 8, "network_lookahead": 4}},
    # auto may make the CRF members' transitions stickier (delta on the diagonal), by held-out
    # macro-F1 of the final labels
    "crf_sticky": {"train": {"auto_crf_sticky": [0.0, 1.0, 2.0, 3.0, 4.0]}},
    "lookahead8": {"model": {"lookahead": 8, "network_lookahead": None}},
    "dropout4": {"model": {"dropout": 0.4}},                    # stronger regularisation
    "wd1e3": {"train": {"weight_decay": 1e-3}},
    "crf_l2": {"model": {"crf_c2": 0.5}},                       # the CRF member 10x more L2
    "folds_validation": {"train": {"validation": "folds"}},     # session folds at any log size
    "crf_future2": {"model": {"crf_future": 2}},                # the CRF member reads t+1, t+2 too
    "hidden128": {"model": {"hidden_dim": 128}},                # the BiLSTM member twice as wide
    "crf_head": {"model": {"crf_head": True}},                  # a CRF output layer on the BiLSTM member
    "resample": {"train": {"resample": True}},                  # oversample chunks with rare steps
    "focal": {"train": {"loss": "focal"}},                      # focal loss instead of cross-entropy
    "featdrop2": {"train": {"feature_dropout": 0.2}},          # lexical and template ids dropped in training
    "featdrop4": {"train": {"feature_dropout": 0.4}},
    "auto_tcn": {"model": {"auto_archs": ["bilstm", "crf", "crf_ahead", "tcn"]}},   # one more auto candidate
    "auto_transformer": {"model": {"auto_archs": ["bilstm", "crf", "crf_ahead", "transformer"]}},
    # no second CRF reading t+1 beside the causal one (the default before 2026-12-05, 11th session)
    "no_crf_ahead": {"model": {"auto_archs": ["bilstm", "crf"]}},
    "crf_ahead2": {"model": {"crf_ahead": 2}},                  # the second CRF reads t+1, t+2
    "crf_ahead12": {"model": {"auto_archs": ["bilstm", "crf", "crf_ahead", "crf_ahead2"]}},  # both
    # the fourth candidate, the BiLSTM reading no later event for the labels on arrival: the
    # default since 2026-12-07 (auto_causal names it as it was tried); no_causal: without it
    "auto_causal": {"model": {"auto_archs": ["bilstm", "crf", "crf_ahead", "bilstm_causal"]}},
    "no_causal": {"model": {"auto_archs": ["bilstm", "crf", "crf_ahead"]}},
}


def log_path(name: str, out: Path, data_dir: Path) -> Path:
    return (out / "data" if DATASETS[name].generate else data_dir) / f"{name}.csv"


def ensure_log(name: str, out: Path, data_dir: Path, echo: Callable[[str], None]) -> Path:
    path = log_path(name, out, data_dir)
    spec = DATASETS[name].generate
    if spec and not path.exists():
        from trainer.generate import generate
        stats = generate(spec["sessions"], spec["seed"], path, profile=spec.get("profile", "default"))
        echo(f"wrote {stats['events']} events in {stats['sessions']} sessions to {path}")
    return path


def load_report(path: Path) -> dict[str, Any] | None:
    """A stored report, or None when there is none (or a run was killed while writing it)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "contenders" in report else None


def same_run(report: dict[str, Any], base: Config, folds: int, seed: int) -> bool:
    """Whether a stored report was made on the same folds with the same base config, so
    its references are the ones a new run fits and its rows can be kept beside new ones."""
    return (report.get("folds"), report.get("seed"), report.get("config")) == (folds, seed, base.to_dict())


def merge(old: dict[str, Any], new: dict[str, Any], order: list[str]) -> dict[str, Any] | None:
    """``new``'s variants added to ``old`` (replacing any of the same name), variants in
    ``order`` first; None when the references scored differently fold by fold, since
    the old rows' paired differences were taken against them."""
    def per_fold(report, name):  # None for a reference the report lacks (an older report)
        row = report["contenders"].get(name)
        return None if row is None else [(s["macro_f1"], s["accuracy"]) for s in row["per_fold"]]
    if any(per_fold(old, r) != per_fold(new, r) for r in REFERENCES):
        return None
    rows = {**old["contenders"], **new["contenders"]}
    names = [n for n in order if n in rows and n not in REFERENCES]
    names += [n for n in rows if n not in names and n not in REFERENCES]
    return {**old, "contenders_config": {**old["contenders_config"], **new["contenders_config"]},
            "archs": names, "seconds": round(old["seconds"] + new["seconds"], 1),
            "contenders": {n: rows[n] for n in (*REFERENCES, *names) if n in rows}}


def run_log(name: str, path: Path, out: Path, variants: list[str], folds: int, seed: int,
            echo: Callable[[str], None], streaming: Optional["StreamingReplay"] = None) -> None:
    """Cross-validate the variants of one log that ``OUT/NAME.json`` lacks (or holds with
    another config), and store it; a report of other folds, seed or base config is replaced."""
    base = from_dict(DATASETS[name].base)
    configs = {v: base.replace(**VARIANTS[v]) for v in variants}
    target = out / f"{name}.json"
    old = load_report(target)
    if old is not None and not same_run(old, base, folds, seed):
        old = None
    have = old["contenders_config"] if old else {}
    todo = [v for v, c in configs.items() if have.get(v) != c.to_dict()]
    if not todo:
        echo(f"{name}: {target} holds {', '.join(variants)} ({folds} folds, seed {seed}); skipped")
        return
    echo(f"{name}: {', '.join(todo)} on {path} ({folds} folds, seed {seed})")
    report = cross_validate(path, base, folds=folds, seed=seed, streaming=streaming,
                            variants={v: VARIANTS[v] for v in todo}, echo=echo)
    if old:
        merged = merge(old, report, variants)
        if merged is None:
            echo(f"{name}: the references score differently from the stored run's; "
                 f"rerunning every variant against the new ones")
            report = cross_validate(path, base, folds=folds, seed=seed, streaming=streaming,
                                    variants={v: VARIANTS[v] for v in variants}, echo=echo)
        else:
            report = merged
    tmp = target.with_suffix(".json.tmp")
    write_report(report, tmp)
    os.replace(tmp, target)   # a killed run never leaves half a report


HEADER = """# Ablation

Generated by `{cmd}` (see `trainer/ablation.py`): `tagger cv` on each log, {folds} folds by
session (fold seed {seed}); each variant and the two CRF references are trained on the other
folds and every session is tested once. Machine: 2 CPU cores shared with other work, one
process, one torch thread; `train s/fold` is wall-clock under that load, comparable only
within a table.

Variants (config overrides on the log's base config): {variants}.
Base configs: {bases}.
"""


def _overrides(over: dict[str, Any]) -> str:
    items = [f"{sec}.{k}: {json.dumps(v)}" for sec, vals in over.items() for k, v in vals.items()]
    return ", ".join(items) if items else "none"


def render(out: Path, order: list[str], cmd: str, folds: int, seed: int) -> str:
    """The doc's generated part: the header and one table per stored report, logs in
    ``order`` first."""
    reports = {p.stem: r for p in sorted(out.glob("*.json")) if (r := load_report(p)) is not None}
    names = [d for d in order if d in reports] + [d for d in reports if d not in order]
    shown = {v for n in names for v in reports[n]["contenders"] if v not in REFERENCES}
    variants = "; ".join(f"`{v}` {_overrides(VARIANTS[v])}" for v in VARIANTS if v in shown)
    bases = "; ".join(f"`{n}` {_overrides(DATASETS[n].base)}" for n in names if n in DATASETS)
    text = HEADER.format(cmd=cmd, folds=folds, seed=seed, variants=variants or "none yet",
                         bases=bases or "none yet")
    for n in names:
        labels = format_labels(reports[n])
        text += f"\n{format_table(reports[n])}\n" + (f"\n{labels}\n" if labels else "")
    return text


def write_doc(doc: Path, text: str) -> None:
    """Replace the generated part of ``doc``, keeping its hand-written sections (from the
    first ``## `` heading on)."""
    keep = ""
    if doc.exists():
        old = doc.read_text(encoding="utf-8")
        i = old.find("\n## ")
        keep = old[i:] if i >= 0 else ""
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text + keep, encoding="utf-8")
    os.replace(tmp, doc)


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    for x in names:
        if x not in known:
            raise ConfigError(f"unknown {what} {x!r}; expected one of {', '.join(known)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--{what}s: name each {what} once: {text!r}")
    return names


def main(argv: list[str] | None = None, echo: Callable[[str], None] | None = None, *,
         streaming: Optional["StreamingReplay"] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    echo = echo or (lambda s: print(s, flush=True))
    ap = argparse.ArgumentParser(prog="python -m tagger.ablation", description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="kasteren,placelab,rebmann_l1,rebmann_l2,wf",
                    help=f"comma-separated logs, of: {', '.join(DATASETS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated variants (default: all), of: {', '.join(VARIANTS)}")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    ap.add_argument("--out", default="results/ablation",
                    help="reports (NAME.json) and generated logs (data/)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ablation.md"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    out, doc, data_dir = Path(a.out), Path(a.doc), Path(a.data_dir)
    cmd = shlex.join(["python", "-m", "tagger.ablation", *argv])
    try:
        datasets = _names(a.datasets, DATASETS, "dataset")
        variants = _names(a.variants, VARIANTS, "variant")
        for d in datasets:     # every config is valid before anything is trained
            base = from_dict(DATASETS[d].base)
            for v in variants:
                base.replace(**VARIANTS[v])
            if not DATASETS[d].generate and not log_path(d, out, data_dir).exists():
                raise ConfigError(f"no log {log_path(d, out, data_dir)} (see --data-dir)")
        out.mkdir(parents=True, exist_ok=True)
        for d in datasets:
            run_log(d, ensure_log(d, out, data_dir, echo), out, variants, a.folds, a.seed, echo, streaming)
            write_doc(doc, render(out, datasets, cmd, a.folds, a.seed))
    except ConfigError as exc:
        print(f"ablation: error: {exc}", file=sys.stderr)
        return 2
    echo(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit("run `python -m tagger.ablation ...`: it passes in the live replay, which lives in `stream`")
