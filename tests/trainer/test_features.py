"""Feature derivation and encoders: parsing of event names, fitting on training data only,
JSON round trips, and one-event encoding identical to whole-session encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from trainer.config import DataConfig, from_dict
from trainer.errors import ConfigError, DataError
from trainer.features import (UNK, EventContext, FeatureEncoder, LabelMap, derive, identifier_keys,
                              name_shape, split_event_name, wall_hour)
from trainer.loading import parse_timestamp, records_to_frame


def test_event_name_parts():
    assert split_event_name("Read: 4695744561 . A543 . in sharepoint") == ("Read", "4695744561 . A543 .", "sharepoint")
    assert split_event_name("Action*: Context in Terminal") == ("Action*", "Context", "Terminal")
    # a Windows path is not a prefix
    assert split_event_name(r"C:\Users\agent\Desktop in Explorer") == (None, r"C:\Users\agent\Desktop", "Explorer")
    assert split_event_name("Komax") == (None, "Komax", None)


def test_shapes_and_identifiers():
    assert name_shape("4214758435 . A226 .") == "9 . A9 ."
    assert "8435" in identifier_keys("5 8435") and "8435" in identifier_keys("4214758435 . A226 .")
    assert "A226" in identifier_keys("4214758435 . A226 .")


@given(st.text(max_size=80))
def test_derive_never_crashes_and_is_deterministic(name):
    ev = {"event_name": name, "_ts": 1.0}
    d1, c1 = derive(ev, EventContext(), DataConfig(), [])
    d2, c2 = derive(ev, EventContext(), DataConfig(), [])
    assert d1 == d2 and c1 == c2
    assert d1["cats"]["action_type"] not in ("", "Unknown")


def test_missing_prefix_is_mapped_to_an_action_not_unknown():
    d, _ = derive({"event_name": r"C:\Users\a\IAS.tpx in Terminal", "_ts": 0.0}, EventContext(), DataConfig(), [])
    assert d["cats"]["action_type"] == "Action*" and d["cats"]["file_extension"] == "tpx"
    assert d["nums"]["has_prefix"] == 0.0 and d["nums"]["path_depth"] == 3


def _frame():
    recs = []
    for s in range(6):
        for i, (name, step) in enumerate([("Read: 4214758435 . A226 . in sharepoint", "Look"),
                                          ("Write: 5 8435 in Acrobat", "Look"),
                                          (f"Action*: Rare{chr(65 + s)}x in Terminal", "Paper")]):
            recs.append({"session_id": str(s), "timestamp": f"2024-01-01T00:00:{i * 3:02d}",
                         "event_name": name, "step_name": step, "group_id": f"g{i}",
                         "duration_s": str(i) if i else "", "app_col": "X"})
    return records_to_frame(recs, require_label=True)


def test_vocab_frequency_cutoff_and_unknowns():
    frame = _frame()
    frame["duration_s"] = frame["duration_s"].replace("", np.nan).astype(float)
    enc = FeatureEncoder.fit(frame, DataConfig(num_features=("duration_s",), cat_features=("app_col",), min_freq=2))
    _, sessions = enc.transform_frame(frame, LabelMap(["Look", "Paper"]))
    # "Rare{s}" templates occur once each -> UNK; the shared ones have ids
    assert (sessions[0].event[2] == UNK) and (sessions[0].event[0] > UNK)
    assert sessions[0].labels.tolist() == [0, 0, 1]
    # the identifier typed in shortened form is recognised as recurring
    assert enc.num_names.index("id_seen_prev") >= 0
    assert "missing:duration_s" in enc.num_names
    assert np.isfinite(sessions[0].nums).all()


def test_json_round_trip_and_transform_one_equals_transform_frame():
    frame = _frame()
    enc = FeatureEncoder.fit(frame, DataConfig())
    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again.spec() == enc.spec()
    sids, whole = enc.transform_frame(frame)
    ctx = None
    rows = []
    for rec in frame[frame.session_id == sids[1]].to_dict("records"):
        one, ctx = again.transform_one(rec, ctx)
        rows.append(one)
    for field in ("event", "tokens", "cats", "nums"):
        np.testing.assert_array_equal(np.concatenate([getattr(r, field) for r in rows]), getattr(whole[1], field))


def test_configured_column_must_exist():
    with pytest.raises(DataError, match="'nope'"):
        FeatureEncoder.fit(_frame(), DataConfig(cat_features=("nope",)))


def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'model.hiden_dim'"):
        from_dict({"model": {"hiden_dim": 3}})
    with pytest.raises(ConfigError, match="train.lr"):
        from_dict({"train": {"lr": "fast"}})
    cfg = from_dict({"data": {"cat_features": ["target_app"], "image_col": "screenshot_path"}})
    assert cfg.data.cat_features == ("target_app",) and cfg.model.arch == "auto"


def test_lexical_features_of_a_window_title():
    from trainer.features import lexical_parts
    general, grams = lexical_parts("Budget Q3 2024.xlsx - Excel")
    assert {"w=budget", "w=q3", "w=<d4>", "w=xlsx", "w=excel", "b=budget|q3"} <= set(general)
    assert "c=<bud" in grams and "c=get>" in grams      # character 4-grams of longer words
    assert lexical_parts("Budget Q3 2025.xlsx - Excel") == (general, grams)   # numbers by length only
    f = general + grams
    assert len(f) == len(set(f))


@given(st.text(max_size=120))
def test_lexical_features_never_crash_and_are_typed(text):
    from trainer.features import lexical_parts
    general, grams = lexical_parts(text)
    assert (general, grams) == lexical_parts(text)
    assert all(x[:2] in ("w=", "b=") for x in general) and all(x[:2] == "c=" for x in grams)


def _named_and_texted(name: str, text: str):
    """Three two-event sessions of one event name and one text column: the frame, an encoder
    fit on it, and its encoded sessions."""
    recs = [{"session_id": str(s), "timestamp": f"2024-01-01T00:00:0{i}", "event_name": name,
             "step_name": "Look", "text": text} for s in range(3) for i in range(2)]
    frame = records_to_frame(recs, require_label=True)
    enc = FeatureEncoder.fit(frame, DataConfig(text_features=("text",)))
    return frame, enc, enc.transform_frame(frame)[1]


def test_words_of_a_text_column_are_kept_before_the_names_character_ngrams():
    # a title long enough that its character 4-grams alone pass MAX_LEX: the text column's
    # words and bigrams still reach the model, and the 4-grams are what the cap cuts
    from trainer.features import MAX_LEX, lexical_parts
    words = ["".join(chr(97 + (5 * i + 3 * j + j * j) % 26) for j in range(10)) for i in range(13)]
    title = " ".join(words)
    assert len(lexical_parts(title)[1]) > MAX_LEX                       # 4-grams alone pass the cap
    frame, enc, sessions = _named_and_texted(title, "invoice approval")
    lex = enc.vocabs["lex"]
    row = set(sessions[0].lex[0].tolist())
    # MAX_LEX of them, then the part of the day (data.time_of_day auto), which the cap never cuts
    assert sessions[0].lex.shape[1] == MAX_LEX + 1 and set(enc.clock_ids().tolist()) & row
    first, last = f"<{words[0]}>"[:4], f"<{words[-1]}>"[-4:]
    assert {lex.index["text:w=invoice"], lex.index["text:b=invoice|approval"], lex.index[f"w={words[0]}"]} <= row
    assert lex.index[f"c={first}"] in row and lex.index[f"c={last}"] not in row   # later 4-grams cut
    # an encoder fit before the 4-grams went last keeps encoding as it was trained: the
    # name's 4-grams first, so the text column's words are what the cap cuts
    old = enc.to_dict()
    del old["data"]["lex_chars_last"]
    again = FeatureEncoder.from_dict(json.loads(json.dumps(old)))
    _, sessions = again.transform_frame(frame)
    row = set(sessions[0].lex[0].tolist())
    assert lex.index[f"c={first}"] in row and lex.index["text:w=invoice"] not in row


def test_a_text_columns_words_are_features_of_their_own_beside_the_names():
    # the same word in the event name and in a text column (a window title in both, say) is
    # two features, each with its own weights, as in the CRF reference; an encoder saved
    # before that keeps encoding both as one, as its model was trained
    frame, enc, sessions = _named_and_texted("Focus: budget 2024 in Excel", "budget 2024")
    lex = enc.vocabs["lex"]
    row = set(sessions[0].lex[0].tolist())
    assert {lex.index["w=budget"], lex.index["text:w=budget"], lex.index["text:b=budget|<d4>"]} <= row
    assert lex.index["w=budget"] != lex.index["text:w=budget"]
    old = enc.to_dict()
    del old["data"]["lex_by_column"]
    old["vocabs"]["lex"] = [s for s in old["vocabs"]["lex"] if not s.startswith("text:")]
    again = FeatureEncoder.from_dict(json.loads(json.dumps(old)))
    assert again.data.lex_by_column is False
    _, sessions = again.transform_frame(frame)
    ids = again.vocabs["lex"].index
    assert sessions[0].lex[0].tolist().count(ids["w=budget"]) == 2   # the name's and the column's


def test_lexical_vocabulary_is_fit_on_training_events_and_capped():
    frame = _frame()
    enc = FeatureEncoder.fit(frame, DataConfig(lexical_max=10))
    # PAD and UNK ids stay reserved; the time of day (data.time_of_day auto) comes on top of the cap
    assert len(enc.vocabs["lex"]) == 10 + 2 + len(enc.clock_features())
    full = FeatureEncoder.fit(frame, DataConfig())
    # features seen once (the RareAx.. names, one session each) are not in the vocabulary
    assert not any("rareax" in s for s in full.vocabs["lex"].items)
    _, sessions = full.transform_frame(frame)
    assert sessions[0].lex.shape[0] == 3 and (sessions[0].lex > 1).any()
    one, _ = full.transform_one(dict(frame.iloc[0]))
    assert np.array_equal(one.lex[0, :one.lex.shape[1]], sessions[0].lex[0, :one.lex.shape[1]])
    off = FeatureEncoder.fit(frame, DataConfig(lexical=False))
    assert "lex" not in off.vocabs and off.spec()["n_lex"] == 0


def _durations(values):
    recs = [{"session_id": str(s), "timestamp": f"2024-01-01T00:{i:02d}:00", "event_name": "Focus: Inbox in Outlook",
             "step_name": "Mail", "duration_s": str(v)} for s in range(2) for i, v in enumerate(values)]
    frame = records_to_frame(recs, require_label=True)
    frame["duration_s"] = frame["duration_s"].astype(float)
    return frame


def test_an_outlying_number_is_clipped_to_num_clip_standard_deviations_when_asked():
    # 39 one-minute focus events and one of ten hours: standardised, the long one is ~6.2
    frame = _durations([60.0] * 39 + [36000.0])
    col = lambda enc: enc.num_names.index("duration_s")  # noqa: E731
    clipped = FeatureEncoder.fit(frame, DataConfig(num_features=("duration_s",), num_clip=5.0))
    _, (s, _) = clipped.transform_frame(frame)
    assert s.nums[:, col(clipped)].max() == pytest.approx(5.0)
    loose = FeatureEncoder.fit(frame, DataConfig(num_features=("duration_s",)))  # the default: no clipping
    _, (s, _) = loose.transform_frame(frame)
    assert s.nums[:, col(loose)].max() > 6.0
    # an encoder saved before the setting existed keeps encoding as it was trained (no clip)
    old = clipped.to_dict()
    del old["data"]["num_clip"]
    _, (s, _) = FeatureEncoder.from_dict(json.loads(json.dumps(old))).transform_frame(frame)
    assert s.nums[:, col(clipped)].max() > 6.0
    with pytest.raises(ConfigError, match="data.num_clip"):
        from_dict({"data": {"num_clip": 0}})


def test_character_ngrams_can_be_left_out_of_the_lexical_features():
    from trainer.features import lexical_parts
    title = "Budget Q3 2024.xlsx - Excel"
    assert lexical_parts(title, True)[1]
    words_only, grams = lexical_parts(title, False)
    assert "w=budget" in words_only and "b=budget|q3" in words_only and grams == ()
    frame = _frame()
    with_chars = FeatureEncoder.fit(frame, DataConfig(char_ngrams=True))
    without = FeatureEncoder.fit(frame, DataConfig(char_ngrams=False))
    assert any(f.startswith("c=") for f in with_chars.vocabs["lex"].items)
    assert not any(f.startswith("c=") for f in without.vocabs["lex"].items)
    # an encoder saved before the setting existed had character n-grams: it keeps them
    old = with_chars.to_dict()
    del old["data"]["char_ngrams"]
    again = FeatureEncoder.from_dict(json.loads(json.dumps(old)))
    assert again.data.char_ngrams
    _, a = with_chars.transform_frame(frame)
    _, b = again.transform_frame(frame)
    np.testing.assert_array_equal(a[0].lex, b[0].lex)


def test_the_hour_of_the_day_is_a_feature_read_off_the_timestamps_clock():
    # data.time_of_day: the same event at 07:xx and at 19:xx differs only by its hour and part
    # of the day; on the UTC clock (data.timezone: UTC) 20:30+02:00 is hour 18
    stamps = ("2024-01-01T07:10:00", "2024-01-02T19:10:00", "2024-01-03T20:30:00+02:00",
              "2024-01-04T07:40:00", "2024-01-05T19:50:00", "2024-01-06T18:05:00Z")
    recs = [{"session_id": str(s), "timestamp": ts, "event_name": "Fridge door opened", "step_name": "Meal"}
            for s, ts in enumerate(stamps)]
    frame = records_to_frame(recs, require_label=True)
    assert not FeatureEncoder.fit(frame, DataConfig(time_of_day=False)).clock_features()
    # auto (the default): the same features, after every other one in the vocabulary
    auto = FeatureEncoder.fit(frame, DataConfig())
    assert auto.vocabs["lex"].items[-2:] == ["dp=1", "dp=4"] and sorted(auto.clock_features()) == ["dp=1", "dp=4"]
    assert auto.vocabs["lex"].items[:-2] == FeatureEncoder.fit(frame, DataConfig(time_of_day=False)).vocabs["lex"].items
    enc = FeatureEncoder.fit(frame, DataConfig(time_of_day=True, time_of_day_hour=True, timezone="UTC"))
    ids = enc.vocabs["lex"].index
    assert "h=20" not in ids
    _, sessions = enc.transform_frame(frame)
    rows = [set(s.lex[0].tolist()) for s in sessions]
    assert {ids["h=7"], ids["dp=1"]} <= rows[0] and ids["h=19"] not in rows[0]
    assert {ids["h=19"], ids["dp=4"]} <= rows[1] and ids["dp=1"] not in rows[1]
    assert {ids["h=18"], ids["dp=4"]} <= rows[2]
    assert rows[0] == rows[3] and rows[2] == rows[5]          # the same hour another day: the same
    one, _ = enc.transform_one(dict(frame.iloc[1]))            # live, one event at a time: the same
    assert {ids["h=19"], ids["dp=4"]} <= set(one.lex[0].tolist())
    # data.time_of_day alone: the part of the day, not the hour
    parts = FeatureEncoder.fit(frame, DataConfig(time_of_day=True))
    assert not any(x.startswith("h=") for x in parts.vocabs["lex"].items)
    _, coarse = parts.transform_frame(frame)
    assert parts.vocabs["lex"].index["dp=4"] in set(coarse[1].lex[0].tolist())
    # an encoder saved before the setting existed keeps encoding without it
    old = enc.to_dict()
    del old["data"]["time_of_day"], old["data"]["timezone"]
    again = FeatureEncoder.from_dict(json.loads(json.dumps(old)))
    assert again.data.time_of_day is False
    _, sessions = again.transform_frame(frame)
    assert not {ids["h=7"], ids["dp=1"]} & set(sessions[0].lex[0].tolist())


def test_the_time_of_day_is_read_on_the_wall_clock_the_timestamp_was_written_in():
    # data.timezone local (the default): 07:26+05:00 is a morning, whatever UTC says (02:26);
    # a timestamp without an offset is read as written, Z and epoch milliseconds on UTC
    stamps = ("2024-05-20 07:26:22.001+05:00", "2024-05-21 07:40:00+05:00", "2024-05-22T07:05:00",
              "2024-05-23T23:30:00Z", "2024-05-24T23:10:00Z", "1716595200000")   # the last: 00:00Z
    recs = [{"session_id": str(s), "timestamp": ts, "event_name": "Open inbox", "step_name": "Mail"}
            for s, ts in enumerate(stamps)]
    frame = records_to_frame(recs, require_label=True)

    def hours(data: DataConfig) -> list[int]:
        enc = FeatureEncoder.fit(frame, data)
        names = {i: f for f, i in enc.vocabs["lex"].index.items()}
        _, sessions = enc.transform_frame(frame)
        out = []
        for s in sessions:
            h = [names[i] for i in s.lex[0].tolist() if names.get(i, "").startswith("h=")]
            out.append(int(h[0][2:]) if h else None)
        return out

    every = {"min_freq": 1, "time_of_day": True, "time_of_day_hour": True}
    assert hours(DataConfig(**every)) == [7, 7, 7, 23, 23, 0]
    # the encoders saved before the setting read the UTC clock, and still do
    assert hours(DataConfig(**every, timezone="UTC")) == [2, 2, 7, 23, 23, 0]
    # a zone name: the instant on that zone's clock (Tokyo: UTC+9), summer time included
    assert hours(DataConfig(**every, timezone="Asia/Tokyo")) == [11, 11, 16, 8, 8, 9]
    for stamp, hour in (("2024-07-01T10:00:00Z", 12), ("2024-01-15T10:00:00Z", 11)):
        assert wall_hour(stamp, parse_timestamp(stamp), "Europe/Berlin") == hour
    enc = FeatureEncoder.fit(frame, DataConfig(**every))
    old = enc.to_dict()
    del old["data"]["timezone"]
    assert FeatureEncoder.from_dict(json.loads(json.dumps(old))).data.timezone == "UTC"
    assert FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict()))).data.timezone == "local"
    # live, one event at a time, from the record's own timestamp text: the same hour
    one, _ = enc.transform_one(dict(frame.iloc[0]))
    assert enc.vocabs["lex"].index["h=7"] in set(one.lex[0].tolist())
