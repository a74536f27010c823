"""Evaluation report: PNG plots and a short text summary of the metrics ``trainer.metrics`` makes.

The report reads one dict, the shape ``trainer.metrics.offline_metrics`` returns (every
section optional; what is missing is not drawn)::

    {"offline":        {"token_accuracy", "macro_f1", "threshold", "coverage",
                        "selective_accuracy", "selective_macro_f1", "aurc"},
     "classification": classification_metrics(...),          # confusion + per-class F1
     "selective":      selective_metrics(...),               # the operating point
     "risk_coverage":  {name: {"coverage": [...], "risk": [...]}},  # or (coverage, risk)
     "aurc":           {name: float} | float,
     "streaming":      aggregate_incremental(...)}           # summary text only

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas rather than pyplot:
nothing is registered in pyplot's global figure list, so nothing needs closing, nothing can
leak across calls, and no display is ever needed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

WRAP = 22           # characters per line of a tick label
ANNOTATE_MAX = 25   # write counts in the confusion cells up to this many labels
DPI = 120


def _wrap(name: str, width: int = WRAP) -> str:
    return textwrap.fill(str(name), width, break_long_words=True) or str(name)


def _shorten(name: str, width: int = 2 * WRAP) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def fmt_small(x: float | None) -> str:
    """A non-negative score that is often tiny (AURC, risk): three decimals while that shows
    it, else two significant digits, so a good model does not read ``0.000``."""
    if x is None:
        return "n/a"
    x = float(x)
    if x == 0.0 or abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.1e}"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return path


def plot_confusion(cm: Any, label_names: Sequence[str], path: str | Path) -> Path:
    """Confusion heatmap, rows true and columns predicted, coloured by share of the true label.

    Colour is row-normalised so rare classes are as visible as common ones; the cells carry
    the raw counts (when there are at most ``ANNOTATE_MAX`` labels).
    """
    cm = np.asarray(cm, dtype=np.float64).reshape(len(label_names), len(label_names))
    k = len(label_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = float(np.clip(0.5 * k + 3.5, 6.0, 30.0))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal")
    names = [_wrap(n) for n in label_names]
    size = 8 if k > 12 else 9
    if k <= 8:
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=size)
    else:
        # Wrapped names collide once columns are narrow: one vertical line each, shortened;
        # the rows keep the full names.
        ax.set_xticks(range(k), [_shorten(n) for n in label_names], rotation=90, fontsize=size)
    ax.set_yticks(range(k), names, fontsize=size)
    ax.set_xlabel("Predicted step")
    ax.set_ylabel("True step")
    ax.set_title(f"Confusion matrix ({int(cm.sum())} events; colour = share of true step)")
    if k <= ANNOTATE_MAX:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true step")
    return _save(fig, path)


def plot_risk_coverage(curves: Mapping[str, Any], path: str | Path,
                       threshold_points: Mapping[str, tuple[float, float]] | None = None,
                       aurcs: Mapping[str, float | None] | None = None) -> Path:
    """Risk-coverage curves, one per name; lower and further right is better.

    ``curves``: name -> ``(coverage, risk)`` or ``{"coverage": ..., "risk": ...}``.
    ``threshold_points``: caption -> ``(coverage, risk)``, drawn as marked operating points.
    ``aurcs``: name -> AURC, shown in the legend.
    """
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        cov, risk = (curve["coverage"], curve["risk"]) if isinstance(curve, Mapping) else curve
        cov, risk = np.asarray(cov, dtype=float), np.asarray(risk, dtype=float)
        label = str(name)
        if aurcs and aurcs.get(name) is not None:
            label += f" (AURC {fmt_small(aurcs[name])})"
        # Straight segments between operating points: each point is an achievable threshold.
        ax.plot(cov, risk, marker="o" if cov.size <= 30 else None, markersize=3, label=label)
    for caption, (c, r) in (threshold_points or {}).items():
        ax.plot([c], [r], marker="*", markersize=13, linestyle="none", color="crimson",
                zorder=5, label=str(caption))
        ax.annotate(f"coverage {c:.2f}\nrisk {fmt_small(r)}", (c, r), textcoords="offset points",
                    xytext=(10, -28), fontsize=8,
                    bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("Coverage (share of events labelled)")
    ax.set_ylabel("Selective risk (error rate on labelled events)")
    ax.set_title("Risk–coverage (lower is better)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=9)
    return _save(fig, path)


def plot_per_class_f1(per_class: Mapping[str, Mapping[str, Any]], path: str | Path,
                      macro_f1: float | None = None) -> Path:
    """Horizontal bars of F1 per step (best on top), annotated with precision, recall, support.

    Only steps present in the test data (support > 0) are drawn: they are the ones macro-F1
    averages over. Horizontal bars keep long step names readable.
    """
    rows = [(n, m) for n, m in per_class.items() if m.get("support", 0) > 0]
    rows.sort(key=lambda r: (r[1].get("f1") or 0.0, r[0]))   # worst first = bottom
    k = len(rows)
    names = [_wrap(n, 40) for n, _ in rows]
    lines = max((n.count("\n") + 1 for n in names), default=1)
    row_height = 0.16 * lines + 0.2      # inches: wrapped names must not touch their neighbours
    fig = Figure(figsize=(10.0, float(np.clip(row_height * k + 1.5, 3.0, 60.0))))
    ax = fig.add_subplot()
    f1 = [m.get("f1") or 0.0 for _, m in rows]
    bars = ax.barh(range(k), f1, color="steelblue", height=0.7)
    ax.set_yticks(range(k), names, fontsize=8 if k > 15 else 9)
    ax.set_ylim(-0.6, k - 0.4)
    for bar, (_, m) in zip(bars, rows):
        p, r = m.get("precision"), m.get("recall")
        text = (f"{m.get('f1') or 0.0:.2f}  (P {'–' if p is None else f'{p:.2f}'}, "
                f"R {'–' if r is None else f'{r:.2f}'}, n={m.get('support', 0)})")
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, text,
                va="center", fontsize=7)
    # Start the axis just below the worst step, not at 0: F1s of 0.94-1.00 on a 0-1 axis all
    # look like full bars. The axis label says where it starts, so short bars are not misread.
    lo = float(np.floor(20 * max(0.0, min(f1, default=0.0) - 0.03)) / 20)
    span = 1.0 - lo
    for text in ax.texts:           # annotations sit just right of each bar, in axis units
        text.set_x(text.get_position()[0] - 0.01 + 0.01 * span)
    if macro_f1 is not None:
        ax.axvline(macro_f1, color="crimson", linestyle="--", linewidth=1,
                   label=f"macro-F1 {macro_f1:.3f}")
        # above the axes: inside, it covered the annotation of a bar
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlim(lo, 1.0 + 0.45 * span)   # room for the annotations right of a full bar
    ticks = np.linspace(lo, 1.0, 6) if lo > 0 else np.linspace(0, 1, 6)
    ax.set_xticks(ticks, [f"{t:.2f}" for t in ticks])
    ax.set_xlabel("F1" + (f" (axis starts at {lo:.2f})" if lo > 0 else ""))
    ax.set_title("F1 per step (test data)", loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _curves(metrics: Mapping[str, Any]) -> dict[str, Any]:
    rc = metrics.get("risk_coverage") or {}
    if isinstance(rc, Mapping) and "coverage" in rc and "risk" in rc:
        return {"model": rc}           # a single unnamed curve
    return dict(rc)


def _aurcs(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    a = metrics.get("aurc")
    if isinstance(a, Mapping):
        return dict(a)
    return {"model": a} if a is not None else {}


def write_report(metrics: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``confusion.png``, ``per_class_f1.png`` and ``risk_coverage.png`` into ``out_dir``.

    ``metrics`` has the shape in the module docstring; a plot whose section is missing is
    skipped. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cls = metrics.get("classification") or {}
    conf = cls.get("confusion")
    if conf and conf.get("labels"):
        written.append(plot_confusion(conf["matrix"], conf["labels"], out / "confusion.png"))
    if cls.get("per_class"):
        written.append(plot_per_class_f1(cls["per_class"], out / "per_class_f1.png",
                                         macro_f1=cls.get("macro_f1")))
    curves = _curves(metrics)
    if curves:
        sel = metrics.get("selective") or {}
        points = None
        if sel.get("coverage") is not None and sel.get("selective_risk") is not None:
            points = {f"threshold {sel['threshold']:.3f}":
                      (sel["coverage"], sel["selective_risk"])}
        written.append(plot_risk_coverage(curves, out / "risk_coverage.png", points,
                                          aurcs=_aurcs(metrics)))
    return written


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}"
    return str(x)


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A few lines for the terminal: accuracy, macro-F1, selective scores, AURC, confusions."""
    cls = metrics.get("classification") or {}
    sel = metrics.get("selective") or {}
    off = metrics.get("offline") or {}
    aurcs = _aurcs(metrics)
    area = off["aurc"] if "aurc" in off else aurcs.get("model", next(iter(aurcs.values()), None))
    lines = []
    n = cls.get("n", sel.get("n", metrics.get("events")))
    lines.append(f"events {_fmt(n)} | token accuracy "
                 f"{_fmt(off.get('token_accuracy', cls.get('token_accuracy')))} | macro-F1 "
                 f"{_fmt(off.get('macro_f1', cls.get('macro_f1')))}")
    if sel or "coverage" in off:
        thr = off.get("threshold", sel.get("threshold"))
        lines.append(
            f"selective @ {_fmt(thr)}: coverage {_fmt(off.get('coverage', sel.get('coverage')))}"
            f" | selective accuracy "
            f"{_fmt(off.get('selective_accuracy', sel.get('selective_accuracy')))}"
            f" | selective macro-F1 "
            f"{_fmt(off.get('selective_macro_f1', sel.get('selective_macro_f1')))}")
    if area is not None:
        lines.append(f"AURC {fmt_small(area)} (lower is better)")
    st = metrics.get("streaming")
    if st:
        lines.append(
            f"streaming: labelled on arrival {_fmt(st.get('first_coverage'))}"
            f" (right {_fmt(st.get('first_accuracy_answered'))})"
            f" | first accuracy {_fmt(st.get('first_accuracy'))} | final accuracy "
            f"{_fmt(st.get('final_accuracy'))} | edit overhead {_fmt(st.get('edit_overhead'))}"
            f" | correction time {_fmt(st.get('correction_time'))} | relative correctness "
            f"{_fmt(st.get('relative_correctness'))} | final = offline "
            f"{_fmt(st.get('final_equals_offline'))}")
    top = cls.get("top_confusions") or []
    if top:
        lines.append("Top confusions (true → predicted):")
        for c in top:
            lines.append(f"  {c['true']} → {c['pred']}: {c['count']} "
                         f"({_fmt(c['share_of_true'], pct=True)} of {c['true']})")
    return "\n".join(lines)


def plot_latency_histogram(latencies_s: Sequence[float], path: str | Path,
                           title: str = "First-label latency (publication to first label record)") -> Path:
    """Histogram of latencies on a log-time axis, with p50, p95 and p99 marked."""
    lat = np.asarray([x for x in latencies_s if x is not None and np.isfinite(x)], dtype=float)
    ms = np.clip(1000.0 * lat, 0.1, None)
    fig = Figure(figsize=(8.0, 4.5))
    ax = fig.add_subplot()
    if ms.size:
        lo, hi = np.log10(ms.min()), np.log10(ms.max())
        bins = np.logspace(lo - 0.05, hi + 0.05, max(10, min(60, int(ms.size ** 0.5) + 5)))
        ax.hist(ms, bins=bins, color="steelblue", alpha=0.85)
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            v = float(np.percentile(ms, q))
            ax.axvline(v, color="crimson", linestyle=style, linewidth=1.2, label=f"p{q} {v:.1f} ms")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_ylabel("events")
    ax.set_title(f"{title}; {ms.size} events", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- session timelines

ABSTAINED_ROW = "(abstained)"


def session_timeline(times: Sequence[float], names: Sequence[str], emissions: Sequence[tuple],
                     gold: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """One session's label history, event by event, for :func:`plot_session_timeline`.

    ``times`` are the events' timestamps (seconds; any origin), ``names`` their event names,
    ``emissions`` the label records in emission order as ``(seq, label_or_None)`` tuples or
    longer tuples whose last item is the label (``(seq, step, label)`` from the streaming
    replay), ``gold`` the true steps when known. An event's last emission is its final label.
    """
    t0 = min(times) if len(times) else 0.0
    out = [{"seq": i, "t": float(t) - t0, "name": str(n), "labels": [],
            "true": None if gold is None else gold[i]} for i, (t, n) in enumerate(zip(times, names))]
    for em in emissions:
        seq, label = int(em[0]), em[-1]
        if 0 <= seq < len(out):
            out[seq]["labels"].append(label)
    return out


def plot_session_timeline(events: Sequence[Mapping[str, Any]], path: str | Path,
                          title: str = "Session timeline", final_seen: bool = True) -> Path:
    """Events along time (x); the steps, and a row for abstentions, down the side (y).

    Per event: the true step (grey square, when known), the first label (open circle), each
    revision (small diamond, joined by a line from the label it replaced) and the final label
    (filled circle: green when it equals the true step, red when not, black when the truth is
    unknown; a grey cross when the final is an abstention). ``events`` come from :func:`session_timeline`; ``final_seen=False`` draws the last
    label of each event as the latest one rather than as final.
    """
    rows: list[str] = []
    for ev in events:       # steps in order of first appearance, truth first
        for name in ([ev.get("true")] + list(ev["labels"])):
            if name is not None and name not in rows:
                rows.append(str(name))
    rows.append(ABSTAINED_ROW)
    y_of = {name: i for i, name in enumerate(reversed(rows))}   # first step at the top

    def y(label):
        return y_of[ABSTAINED_ROW if label is None else str(label)]

    n = len(events)
    fig = Figure(figsize=(float(np.clip(6 + 0.18 * n, 9.0, 22.0)), 1.6 + 0.42 * len(rows)))
    ax = fig.add_subplot()
    ts = [ev["t"] for ev in events]
    handles: dict[str, Any] = {}
    for ev in events:
        t, labels = ev["t"], list(ev["labels"])
        if ev.get("true") is not None:
            handles["true step"] = ax.scatter([t], [y(ev["true"])], marker="s", s=110, color="0.85",
                                              zorder=1, label="true step")
        if not labels:
            continue
        ys = [y(lab) for lab in labels]
        if len(ys) > 1:
            ax.plot([t] * len(ys), ys, color="tab:orange", linewidth=1, alpha=0.7, zorder=2)
        handles["first label"] = ax.scatter([t], [ys[0]], marker="o", s=46, facecolors="none",
                                            edgecolors="tab:blue", linewidths=1.3, zorder=3,
                                            label="first label")
        for yy in ys[1:-1]:
            handles["revision"] = ax.scatter([t], [yy], marker="D", s=18, color="tab:orange", zorder=3,
                                             label="revision")
        last = labels[-1]
        if not final_seen:
            key, color = "latest label", "0.3"
        elif last is None:
            key, color = "final, abstained", "0.35"
        elif ev.get("true") is None:
            key, color = "final label", "black"
        elif last == ev["true"]:
            key, color = "final, right", "tab:green"
        else:
            key, color = "final, wrong", "tab:red"
        handles[key] = ax.scatter([t], [ys[-1]], marker="x" if last is None else "o", s=22,
                                  color=color, zorder=4, label=key)
    ax.set_yticks(range(len(rows)), [_wrap(r, 30) for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    if ts:
        pad = max(1.0, 0.02 * (max(ts) - min(ts)))
        ax.set_xlim(min(ts) - pad, max(ts) + pad)
    ax.set_xlabel("seconds since the session's first event")
    ax.grid(axis="y", alpha=0.25)
    ax.set_title(title, loc="left", fontsize=10)
    order = ["true step", "first label", "revision", "final, right", "final, wrong", "final, abstained",
             "final label", "latest label"]
    shown = [k for k in order if k in handles]
    if shown:
        ax.legend([handles[k] for k in shown], shown, loc="lower left", bbox_to_anchor=(0.0, 1.06),
                  ncol=len(shown), fontsize=8, frameon=False)
    return _save(fig, path)


def timeline_title(sid: str, events: Sequence[Mapping[str, Any]]) -> str:
    """``Session <sid>: n events, r label changes, first/final accuracy`` (accuracy when known)."""
    changes = sum(sum(1 for a, b in zip(ev["labels"], ev["labels"][1:]) if a != b) for ev in events)
    text = f"Session {sid}: {len(events)} events, {changes} label changes after the first label"
    known = [ev for ev in events if ev.get("true") is not None and ev["labels"]]
    if known:
        first = np.mean([ev["labels"][0] == ev["true"] for ev in known])
        final = np.mean([ev["labels"][-1] == ev["true"] for ev in known])
        text += f"; first-label accuracy {first:.2f}, final {final:.2f}"
    return text


def pick_timeline_sessions(histories: Mapping[str, Sequence[Mapping[str, Any]]], k: int = 3) -> list[str]:
    """A few sessions worth drawing: the first one, then those whose labels changed most."""
    ids = list(histories)
    if not ids:
        return []

    def changes(sid):
        return sum(len(ev["labels"]) - 1 for ev in histories[sid])

    chosen = [ids[0]]
    for sid in sorted(ids[1:], key=lambda s: (-changes(s), ids.index(s))):
        if len(chosen) >= k:
            break
        chosen.append(sid)
    return chosen


def write_timelines(histories: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                    k: int = 3, final_seen: bool = True) -> list[Path]:
    """``timeline_<session>.png`` for :func:`pick_timeline_sessions` of ``histories``."""
    out = Path(out_dir)
    paths = []
    for sid in pick_timeline_sessions(histories, k):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(sid))[:60]
        paths.append(plot_session_timeline(histories[sid], out / f"timeline_{safe}.png",
                                           timeline_title(sid, histories[sid]), final_seen=final_seen))
    return paths
