"""Reading event logs (CSV or Parquet) into one canonical, ordered DataFrame.

Owns: encoding detection (UTF-8, else Latin-1), quoted fields, timestamp parsing (ISO 8601
with or without offset, epoch milliseconds, mixed in one file), event-id derivation, and the
event order inside a session. Every problem is reported with file, line and field; with
``skip_bad_rows`` the bad rows are dropped and listed in the load report instead.

The canonical frame has, besides the file's own columns (kept as strings):
``session_id`` (str), ``timestamp`` (the original string), ``_ts`` (float seconds since the
epoch, UTC), ``event_id`` (str), ``_line`` (1-based line in the file; the header is line 1)
and ``seq`` (0-based position inside the session after ordering).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from trainer.errors import DataError

REQUIRED = ("session_id", "timestamp", "event_name")
LABEL = "step_name"

_EPOCH_MS = re.compile(r"^\s*-?\d{9,15}(\.\d+)?\s*$")


@dataclass
class BadRow:
    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass
class LoadReport:
    path: str
    encoding: str
    rows_read: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    repeats: int = 0   # identical repeats without event_id (kept; see ``canonicalize``)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - len(self.bad_rows)

    def summary(self) -> str:
        text = f"{self.path}: {self.rows_kept} of {self.rows_read} rows loaded ({self.encoding})"
        if self.bad_rows:
            shown = "; ".join(str(b) for b in self.bad_rows[:5])
            more = f" and {len(self.bad_rows) - 5} more" if len(self.bad_rows) > 5 else ""
            text += f"; skipped {len(self.bad_rows)} bad rows: {shown}{more}"
        if self.repeats:
            text += (f"; {self.repeats} rows repeat an earlier event of their session exactly (timestamp "
                     f"and name) without an event_id: kept, with ids counting the repeats (as `tagger "
                     f"publish` sends them); an agent that omits event_id gets them dropped live as "
                     f"redeliveries, so give events an event_id")
        return text


def parse_timestamp(value: Any) -> float:
    """One timestamp to float seconds since the epoch (UTC). Raises DataError (a ValueError).

    Accepts ISO 8601 with or without offset (naive times are taken as UTC), a space or
    ``T`` separator, fractional seconds, and epoch milliseconds (int, float or digit string).
    """
    if isinstance(value, bool) or value is None:
        raise DataError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, int) and abs(value) > 10 ** 15:
            raise DataError(f"timestamp out of range: {value!r}")
        if not np.isfinite(value):
            raise DataError(f"not a timestamp: {value!r}")
        return float(value) / 1000.0
    text = str(value).strip()
    if not text:
        raise DataError("empty timestamp")
    if _EPOCH_MS.match(text):
        return float(text) / 1000.0
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise DataError(f"unparseable timestamp {text!r} (expected ISO 8601 or epoch ms)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def utc_offset(value: Any) -> float:
    """The UTC offset, in seconds, that a timestamp was written with (``09:00+05:00``:
    18000): 0 for ``Z``, for epoch milliseconds and for a time without an offset (which
    ``parse_timestamp`` takes as UTC, so that it reads as written). For values that
    ``parse_timestamp`` accepts; anything else gives 0."""
    if not isinstance(value, str):
        return 0.0
    text = value.strip()
    if not text or text[-1] in "Zz" or _EPOCH_MS.match(text):
        return 0.0
    try:
        offset = datetime.fromisoformat(text).utcoffset()
    except ValueError:
        return 0.0
    return offset.total_seconds() if offset is not None else 0.0


def derive_event_id(session_id: str, timestamp: str, event_name: str, occurrence: int = 0) -> str:
    """A deterministic id from an event's content: the same event redelivered gets the same id."""
    key = f"{session_id}\x1f{timestamp}\x1f{event_name}\x1f{occurrence}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def _decode(raw: bytes) -> tuple[str, str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _read_csv(path: Path, report: LoadReport, skip_bad_rows: bool) -> pd.DataFrame:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    text, report.encoding = _decode(raw)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("the file is empty", path=str(path)) from None
    except csv.Error as exc:
        raise DataError(f"malformed header: {exc}", path=str(path), line=1) from exc
    header = [h.strip() for h in header]
    dup = {h for h in header if header.count(h) > 1}
    if dup:
        raise DataError(f"duplicate column names {sorted(dup)}", path=str(path), line=1)
    rows, lines = [], []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad = BadRow(start, None, f"malformed CSV row: {exc}")
            if not skip_bad_rows:
                raise DataError(bad.reason, path=str(path), line=start) from exc
            report.rows_read += 1
            report.bad_rows.append(bad)
            start = reader.line_num + 1
            continue
        line = start
        start = reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        report.rows_read += 1
        if len(row) != len(header):
            bad = BadRow(line, None, f"malformed row: expected {len(header)} fields, found {len(row)}")
            if not skip_bad_rows:
                raise DataError(bad.reason, path=str(path), line=line)
            report.bad_rows.append(bad)
            continue
        rows.append(row)
        lines.append(line)
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame["_line"] = np.asarray(lines, dtype=np.int64)
    return frame


def _read_parquet(path: Path, report: LoadReport) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types; translate at the edge
        raise DataError(f"cannot read Parquet: {exc}", path=str(path)) from exc
    report.encoding = "parquet"
    report.rows_read = len(frame)
    frame = frame.astype(object).where(frame.notna(), "")
    frame["_line"] = np.arange(2, len(frame) + 2, dtype=np.int64)  # "line" = row + header
    return frame


def read_events(path: str | Path, *, require_label: bool = True, skip_bad_rows: bool = False,
                numeric_columns: Iterable[str] = (), required_columns: Iterable[str] = ()
                ) -> tuple[pd.DataFrame, LoadReport]:
    """Load an event log, validate it, order each session's events, derive missing ids."""
    path = Path(path)
    report = LoadReport(path=str(path), encoding="?")
    if path.suffix.lower() in (".parquet", ".pq"):
        frame = _read_parquet(path, report)
    else:
        frame = _read_csv(path, report, skip_bad_rows)
    needed = list(REQUIRED) + ([LABEL] if require_label else []) + list(required_columns)
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"missing required column(s) {missing}; found {list(frame.columns[:-1])}",
                        path=str(path), line=1)
    return canonicalize(frame, report, require_label=require_label, skip_bad_rows=skip_bad_rows,
                        numeric_columns=numeric_columns), report


def canonicalize(frame: pd.DataFrame, report: LoadReport, *, require_label: bool,
                 skip_bad_rows: bool, numeric_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Validate rows, parse timestamps, order sessions. ``frame`` must carry ``_line``."""
    path = report.path
    bad: dict[int, BadRow] = {}

    def flag(idx: int, fld: str, reason: str) -> None:
        line = int(frame.at[idx, "_line"])
        if not skip_bad_rows:
            raise DataError(reason, path=path, line=line, field=fld)
        bad.setdefault(idx, BadRow(line, fld, reason))

    for col in ("session_id", "event_name") + ((LABEL,) if require_label else ()):
        values = frame[col].astype(str).str.strip()
        frame[col] = values
        for idx in frame.index[values == ""]:
            flag(idx, col, f"empty {col}")
    ts = np.empty(len(frame), dtype=np.float64)
    for i, (idx, value) in enumerate(zip(frame.index, frame["timestamp"])):
        try:
            ts[i] = parse_timestamp(value)
        except ValueError as exc:
            ts[i] = np.nan
            flag(idx, "timestamp", str(exc))
    frame["_ts"] = ts
    frame["timestamp"] = frame["timestamp"].astype(str)
    for col in numeric_columns:
        if col not in frame.columns:
            continue
        raw = frame[col].astype(str).str.strip()
        num = pd.to_numeric(raw.where(raw != "", None), errors="coerce")
        for idx in frame.index[num.isna() & (raw != "") & (raw.str.lower() != "nan")]:
            flag(idx, col, f"not a number: {frame.at[idx, col]!r}")
        frame[col] = num.astype(float)
    if bad:
        report.bad_rows.extend(bad.values())
        report.bad_rows.sort(key=lambda b: b.line)
        frame = frame.drop(index=list(bad))
    if frame.empty:
        raise DataError("no valid rows", path=path)
    # Sessions keep the order of their first appearance; inside a session events are ordered
    # by time, and ties keep file order (a stable sort): the file order is not trusted.
    first_seen = {s: i for i, s in enumerate(pd.unique(frame["session_id"]))}
    frame = frame.assign(_sess_order=frame["session_id"].map(first_seen))
    frame = frame.sort_values(["_sess_order", "_ts", "_line"], kind="stable").drop(columns="_sess_order")
    frame = frame.reset_index(drop=True)
    frame["seq"] = frame.groupby("session_id", sort=False).cumcount().astype(np.int64)
    if "event_id" not in frame.columns:
        frame["event_id"] = ""
    frame["event_id"] = frame["event_id"].astype(str).str.strip()
    missing_id = frame["event_id"] == ""
    if missing_id.any():
        # A repeat keeps its row (a focus log with one-minute timestamps repeats titles within
        # a minute all the time); its id counts the repeats. Live, a message without event_id
        # cannot be told from a redelivery, so the summary tells users to send ids.
        occ = frame.groupby(["session_id", "timestamp", "event_name"], sort=False).cumcount()
        report.repeats = int((missing_id & (occ > 0)).sum())
        frame.loc[missing_id, "event_id"] = [
            derive_event_id(s, t, e, o) for s, t, e, o in zip(
                frame.loc[missing_id, "session_id"], frame.loc[missing_id, "timestamp"],
                frame.loc[missing_id, "event_name"], occ[missing_id])]
    dup = frame.duplicated(["session_id", "event_id"], keep="first")
    if dup.any():
        lines = frame.loc[dup, "_line"].tolist()
        if not skip_bad_rows:
            raise DataError(f"duplicate event_id {frame.loc[dup, 'event_id'].iloc[0]!r} in session",
                            path=path, line=int(lines[0]), field="event_id")
        report.bad_rows.extend(BadRow(int(l), "event_id", "duplicate event_id") for l in lines)
        frame = frame[~dup].reset_index(drop=True)
        frame["seq"] = frame.groupby("session_id", sort=False).cumcount().astype(np.int64)
    return frame


def records_to_frame(records: list[Mapping[str, Any]], *, require_label: bool = False) -> pd.DataFrame:
    """Canonical frame from in-memory event dicts (used by tests and the streaming replay)."""
    frame = pd.DataFrame([dict(r) for r in records], dtype=object)
    frame["_line"] = np.arange(1, len(frame) + 1, dtype=np.int64)
    report = LoadReport(path="<records>", encoding="utf-8", rows_read=len(frame))
    return canonicalize(frame, report, require_label=require_label, skip_bad_rows=False)


def split_sessions(frame: pd.DataFrame, test_size: float, val_size: float, seed: int
                   ) -> tuple[list[str], list[str], list[str]]:
    """Session ids for train, validation and test: a seeded split by session, never by event."""
    sessions = np.array(pd.unique(frame["session_id"]), dtype=object)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sessions))
    n_test = int(round(test_size * len(sessions)))
    n_val = int(round(val_size * len(sessions)))
    if len(sessions) >= 3:
        n_test = max(n_test, 1) if test_size > 0 else 0
        n_val = max(n_val, 1) if val_size > 0 else 0
    test = sessions[order[:n_test]].tolist()
    val = sessions[order[n_test:n_test + n_val]].tolist()
    train = sessions[order[n_test + n_val:]].tolist()
    return train, val, test


def fingerprint(path: str | Path) -> str:
    """sha256 of a data file's bytes: stored in artifacts to say what a model was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
