"""The generated logs have the properties DATA.md describes, and are reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tagger.cli import main
from trainer.errors import ConfigError
from trainer.generate import COLUMNS, OUT_OF_PROCESS, STEPS, WF_COLUMNS, WF_DEFAULT_DAYS, generate

AU, NAU = "Account Update Duty Invoice", "No Account Update Duty Invoice"
IAS = r"Action*: C:\Users\agent\Desktop\IAS.tpx ... in Terminal"
REVEALS_AU = "Action*: F6 Account Maintenance in Terminal"
REVEALS_NAU = "Action*: Invoice Confirmation - No Change in Terminal"


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    path = tmp_path_factory.mktemp("gen") / "log.csv"
    stats = generate(3000, 1, path)
    return path, stats, pd.read_csv(path)


@pytest.fixture(scope="module")
def ordered(log) -> pd.DataFrame:
    """The log in true (timestamp) order, with a step-segment id and position in segment."""
    df = log[2].copy()
    df["ts"] = pd.to_datetime(df["timestamp"], format="ISO8601")
    df = df.sort_values(["session_id", "ts"], kind="stable").reset_index(drop=True)
    new = (df["step_name"] != df.groupby("session_id")["step_name"].shift()) | (
        df["session_id"] != df["session_id"].shift())
    df["segment"] = new.cumsum()
    df["pos"] = df.groupby("segment").cumcount()
    df["shape"] = df["event_name"].str.replace(r"\d", "#", regex=True)
    return df


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    generate(150, 7, a)
    generate(150, 7, b)
    generate(150, 8, c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_different_seeds_never_share_a_session_id(tmp_path):
    """A test set and a "new" set made with other seeds can go to one topic unmixed."""
    ids = {}
    for seed in (0, 1, 2, 8):
        generate(60, seed, tmp_path / f"s{seed}.csv")
        ids[seed] = set(pd.read_csv(tmp_path / f"s{seed}.csv")["session_id"])
        assert len(ids[seed]) == 60
    seeds = list(ids)
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            assert not ids[a] & ids[b], (a, b)


def test_columns_types_and_stats(log):
    path, stats, df = log
    assert list(df.columns) == COLUMNS
    assert stats["path"] == str(path)
    assert stats["events"] == len(df) and stats["sessions"] == df["session_id"].nunique() == 3000
    assert sum(stats["steps"].values()) == len(df)
    assert set(df["step_name"]) == set(STEPS)
    assert df["group_id"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert pd.api.types.is_numeric_dtype(df["duration_s"])
    assert 0 < df["duration_s"].isna().mean() < 0.05   # a few empty cells, not many
    assert (df["duration_s"].dropna() > 0).all()
    assert (df["text"].isna().mean() > 0.05) and df["text"].notna().mean() > 0.5
    # target_app is the app named at the end of the event name
    assert (df.apply(lambda r: r["event_name"].endswith(" in " + r["target_app"]), axis=1)).all()


def test_timestamps_parse_with_offset_and_subsecond_ties(log):
    df = log[2]
    ts = pd.to_datetime(df["timestamp"], format="ISO8601")
    assert str(ts.dt.tz) == "UTC+05:00"
    assert df["timestamp"].str.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3}000)?\+05:00").all()
    assert df["timestamp"].str.contains(r"\.001000\+").any()
    assert df["timestamp"].str.contains(r"\.002000\+").any()
    assert 17 <= ts.dt.date.nunique() <= 19


def test_session_shape_is_like_the_real_log(ordered):
    g = ordered.groupby("session_id")
    n = g.size()
    span = (g["ts"].max() - g["ts"].min()).dt.total_seconds()
    assert 13 <= n.mean() <= 23
    assert (n >= 60).sum() >= 5            # a long tail
    assert 50 <= span.mean() <= 90 and 40 <= span.median() <= 70
    gaps = g["ts"].diff().dropna().dt.total_seconds()
    assert gaps.max() < 11 and (gaps < 1).mean() > 0.05


def test_file_order_sometimes_disagrees_with_timestamps(log):
    df = log[2]
    ts = pd.to_datetime(df["timestamp"], format="ISO8601")
    backwards = (ts.groupby(df["session_id"]).diff() < pd.Timedelta(0)).mean()
    assert 0.01 < backwards < 0.06
    # a few sessions are interleaved: a session id comes back after another one started
    runs = (df["session_id"] != df["session_id"].shift()).groupby(df["session_id"]).sum()
    assert 0.01 < (runs > 1).mean() < 0.15


def test_prefixes_and_rare_unprefixed_events(log):
    df = log[2]
    prefix = df["event_name"].str.extract(r"^(Read|Write|Action\*|Action): ")[0]
    assert set(prefix.dropna()) == {"Read", "Write", "Action", "Action*"}
    assert 0.0002 < prefix.isna().mean() < 0.0015
    # one unprefixed event starts with a drive letter: splitting on ':' would be wrong
    assert df.loc[prefix.isna(), "event_name"].str.startswith("C:\\").any()


def test_commas_in_fields_are_quoted_and_round_trip(log):
    path, _, df = log
    raw = path.read_text()
    assert '"Action*: DP,PA in ibbr-global.dhl"' in raw
    assert (df["event_name"] == "Action*: DP,PA in ibbr-global.dhl").any()
    assert df["event_name"].str.contains(",").mean() > 0.01
    assert (df["step_name"].isin(STEPS)).all()   # no shifted columns anywhere


def test_out_of_process_is_rare_and_mostly_writes_and_actions(log):
    df = log[2]
    oop = df[df["step_name"] == OUT_OF_PROCESS]
    assert 0.003 < len(oop) / len(df) < 0.012
    assert oop["event_name"].str.match(r"(Write|Action\*): ").mean() > 0.8
    # it is not given away by the event name alone
    assert (df.loc[df["step_name"] != OUT_OF_PROCESS, "event_name"]
            .isin(set(oop["event_name"]))).any()
    counts = df["step_name"].value_counts()
    assert counts.max() / counts.min() > 20   # imbalanced labels


def test_same_event_belongs_to_several_steps(log):
    df = log[2]
    assert {"Paperwork", AU, NAU} <= set(df.loc[df["event_name"] == IAS, "step_name"])
    shapes = df["event_name"].str.replace(r"\d", "#", regex=True)
    steps_per_shape = df.groupby(shapes)["step_name"].nunique()
    assert (steps_per_shape >= 3).sum() >= 8


def test_invoice_branches_start_alike_and_are_revealed_later(ordered):
    first = {}
    for step in (AU, NAU):
        seg = ordered[ordered["step_name"] == step]
        first[step] = seg.loc[seg["pos"] == 0, "shape"].value_counts(normalize=True)
        assert first[step].index[0] == IAS
    # the opening events are drawn from the same distribution in both branches
    tv = 0.5 * first[AU].sub(first[NAU], fill_value=0).abs().sum()
    assert tv < 0.08
    # the revealing events belong to one branch only, and mostly come after the opening
    for reveal, step in ((REVEALS_AU, AU), (REVEALS_NAU, NAU)):
        rows = ordered[ordered["event_name"] == reveal]
        assert set(rows["step_name"]) == {step}
        assert (rows["pos"] >= 2).mean() > 0.8


def test_per_event_classifier_is_worse_on_branch_steps_than_segment_context(ordered):
    branch = ordered[ordered["step_name"].isin([AU, NAU])]
    majority = ordered.groupby("shape")["step_name"].agg(lambda s: s.value_counts().index[0])
    per_event = (branch["shape"].map(majority) == branch["step_name"]).mean()
    # whole-segment context: does the segment contain a revealing event?
    names = branch.groupby("segment")["event_name"].agg(set)
    guess = names.map(lambda s: AU if REVEALS_AU in s or not REVEALS_NAU in s else NAU)
    truth = branch.groupby("segment")["step_name"].first()
    with_context = (branch["segment"].map(guess) == branch["step_name"]).mean()
    assert per_event < 0.75
    assert with_context > 0.9 and (guess == truth).mean() > 0.9


def test_identifiers_recur_across_apps_within_a_step(ordered):
    pw = ordered[ordered["step_name"] == "Paperwork"]
    acct = pw["event_name"].str.extract(
        r"^Read: (\d{10}) \. [A-Z]\d{3} \. in dpdhl\.sharepoint$")[0].dropna()
    elsewhere = (pw[pw["target_app"] != "dpdhl.sharepoint"]
                 .groupby("segment")["event_name"].agg(" | ".join))
    seen = [a[-4:] in elsewhere.get(seg, "")
            for seg, a in zip(pw.loc[acct.index, "segment"], acct)]
    assert len(seen) > 100 and sum(seen) / len(seen) > 0.6


def test_images_are_pngs_next_to_the_csv_and_do_not_change_the_data(tmp_path):
    out = tmp_path / "run" / "log.csv"
    stats = generate(12, 3, out, images_dir=tmp_path / "run" / "shots")
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS + ["screenshot_path"]
    assert stats["images"] == len(df) > 0
    assert not df["screenshot_path"].str.startswith("/").any()
    for rel in df["screenshot_path"]:
        with Image.open(out.parent / rel) as img:
            assert img.format == "PNG" and img.size == (128, 96)
            img.verify()
    # turning images on adds a column and nothing else
    plain = tmp_path / "plain.csv"
    generate(12, 3, plain)
    pd.testing.assert_frame_equal(df.drop(columns="screenshot_path"), pd.read_csv(plain))
    # same seed, same pictures
    again = tmp_path / "again" / "log.csv"
    generate(12, 3, again, images_dir=tmp_path / "again" / "shots")
    for rel in df["screenshot_path"][:20]:
        assert (out.parent / rel).read_bytes() == (again.parent / rel).read_bytes()


def test_account_update_and_no_change_screens_look_different(tmp_path):
    out = tmp_path / "log.csv"
    generate(30, 5, out, images_dir=tmp_path / "shots")
    df = pd.read_csv(out)

    def mean_color(name):
        rels = df.loc[df["event_name"] == name, "screenshot_path"][:10]
        assert len(rels) > 0
        px = [Image.open(tmp_path / r).convert("RGB").resize((1, 1), Image.BOX).getpixel((0, 0))
              for r in rels]
        return [sum(c) / len(px) for c in zip(*px)]

    au, nau = mean_color(REVEALS_AU), mean_color(REVEALS_NAU)
    assert au[0] - nau[0] > 5    # the maintenance screen is yellower (more red)...
    assert nau[2] - au[2] > 5    # ...the no-change screen bluer


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    generate(5, 1, tmp_path / "p.csv", progress=True)
    captured = capsys.readouterr()
    assert "sessions" in captured.err and captured.out == ""


# --------------------------------------------------------------------------------------
# Profiles: the default stays byte-identical; window-focus has the real log's statistics
# --------------------------------------------------------------------------------------

# sha256 of `generate(50, 7, ...)` with the default profile, taken before profiles existed.
# If a deliberate change to the default profile moves it, update it in the same commit.
# Moved once (issue #13): each seed got its own block of session ids (seed 7: 70010001...);
# mapping them back to 1xxxx gives the earlier cd30c4b7...11e4 byte for byte.
DEFAULT_50_7_SHA256 = "89abd2042c0d5edd86d08b28094b720921514903c17162e82ed12e10e31d3bae"


def test_default_profile_output_is_pinned(tmp_path):
    generate(50, 7, tmp_path / "a.csv")
    generate(50, 7, tmp_path / "b.csv", profile="default")
    digest = hashlib.sha256((tmp_path / "a.csv").read_bytes()).hexdigest()
    assert digest == DEFAULT_50_7_SHA256
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def _majority_share(df: pd.DataFrame, key: str) -> float:
    """Share of events whose label is the most common label of their `key` value: the
    accuracy of the best classifier that sees only that column (in-sample)."""
    return df.groupby([key, "step_name"]).size().groupby(level=0).max().sum() / len(df)


@pytest.fixture(scope="module", params=[1, 2])
def focus(request, tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    path = tmp_path_factory.mktemp("focus") / f"focus{request.param}.csv"
    stats = generate(None, request.param, path, profile="window-focus")
    df = pd.read_csv(path)
    day = {s: i for i, s in enumerate(pd.unique(df["session_id"]))}
    df["day"] = df["session_id"].map(day)
    new_run = (df["step_name"] != df["step_name"].shift()) | (df["day"] != df["day"].shift())
    df["run"] = new_run.cumsum()
    return stats, df


def test_focus_rows_sessions_and_ids(focus, tmp_path):
    stats, df = focus
    assert list(df.columns[:7]) == WF_COLUMNS
    assert stats["sessions"] == df["session_id"].nunique() == WF_DEFAULT_DAYS == 20
    assert stats["events"] == len(df) and sum(stats["steps"].values()) == len(df)
    # a session is a working day, its rows together, its id naming the seed and the date
    assert df["session_id"].is_monotonic_increasing
    dates = pd.to_datetime(df["session_id"].str.extract(r"^wf\d+-(\d{4}-\d\d-\d\d)$")[0])
    assert (dates.dt.day_of_week < 5).all()
    assert (df["timestamp"].str[:10] == df["session_id"].str[-10:]).all()
    assert (df["event_name"] == "Focus: " + df["text"] + " in " + df["target_app"]).all()
    other = tmp_path / "other.csv"
    generate(3, 99, other, profile="window-focus")
    assert not set(pd.read_csv(other)["session_id"]) & set(df["session_id"])


def test_focus_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    for path, seed in ((a, 5), (b, 5), (c, 6)):
        generate(4, seed, path, profile="window-focus")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_focus_days_and_activities(focus):
    _, df = focus
    per_day = df.groupby("day").size()
    assert 8_500 <= len(df) <= 11_500                    # real: 10,066
    assert 380 <= per_day.median() <= 520               # real: 450
    assert 60 <= per_day.min() <= 170 and 900 <= per_day.max() <= 1_600   # real: 107-1,240
    assert 6 <= df.groupby("day")["step_name"].nunique().mean() <= 8      # real: about 7
    share = df["step_name"].value_counts(normalize=True)
    assert len(share) == 28
    assert 0.12 <= share.iloc[0] <= 0.15                 # real: 13.5%
    assert 7 <= (share < 0.01).sum() <= 11               # real: 9
    # one activity starts only in the last days (and is then worked on more than once)
    first, days = df.groupby("step_name")["day"].min(), df.groupby("step_name")["day"].nunique()
    late = first[first >= 0.75 * df["day"].nunique()].index
    assert any(days[a] >= 2 for a in late)


def test_focus_apps_are_skewed_and_say_little(focus):
    _, df = focus
    share = df["target_app"].value_counts(normalize=True)
    assert 32 <= len(share) <= 34                        # real: 34
    expected = {"Google Chrome": (0.38, 0.48), "Outlook": (0.09, 0.16),   # real: 43%, 12%,
                "File Explorer": (0.06, 0.10), "PowerPoint": (0.06, 0.10),  # 8%, 8%,
                "Microsoft Teams": (0.045, 0.085), "Word": (0.045, 0.085)}  # 6%, 6%
    for app, (lo, hi) in expected.items():
        assert lo <= share[app] <= hi, (app, share[app])
    assert 0.22 <= _majority_share(df, "target_app") <= 0.33     # real: 0.27


def test_focus_titles_are_many_mostly_one_day_and_carry_the_activity(focus):
    _, df = focus
    days_per_title = df.groupby("text")["day"].nunique()
    recurring = days_per_title[days_per_title >= 2].index
    assert 1_700 <= len(days_per_title) <= 2_300                         # real: 1,967
    assert 0.12 <= len(recurring) / len(days_per_title) <= 0.21          # real: 16%
    assert 0.52 <= df["text"].isin(recurring).mean() <= 0.66             # real: 59%
    assert 0.70 <= _majority_share(df, "text") <= 0.80                   # real: 0.74


def test_focus_runs_interleave(focus):
    _, df = focus
    runs = df.groupby("run").size()
    assert 3 <= runs.median() <= 7                       # real: 5
    assert 17 <= runs.mean() <= 28                       # real: 22
    assert 45 <= runs.quantile(0.9) <= 80                # real: 59
    # activities are returned to within a day
    runs_per_activity_day = df.groupby(["day", "step_name"])["run"].nunique()
    assert (runs_per_activity_day >= 2).mean() > 0.3


def test_focus_minute_timestamps_tie_and_durations(focus):
    _, df = focus
    assert df["timestamp"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00").all()
    ts = pd.to_datetime(df["timestamp"])
    same_day = df["day"] == df["day"].shift()
    gap = (ts - ts.shift()).dt.total_seconds()[same_day]
    assert (gap >= 0).all()                              # file order is time order...
    assert 0.64 <= (gap == 0).mean() <= 0.74             # ...and the only one. real: 69% ties
    dur = df["duration_s"]
    assert dur.median() == 0 and dur.quantile(0.9) == 60     # real: median 0, p90 60 s
    # a focus lasts until the next one in the day
    nxt = (ts.shift(-1) - ts).dt.total_seconds()
    inside = df["day"] == df["day"].shift(-1)
    assert (dur[inside] == nxt[inside]).all() and (dur % 60 == 0).all()


def test_focus_shared_windows_take_the_label_of_their_context(focus):
    _, df = focus
    shared = df.groupby("text")["step_name"].nunique() >= 8   # inbox, desktop, new tab, ...
    is_shared = df["text"].map(shared)
    assert {"Inbox - m.keller@northwind.example - Outlook", "Desktop",
            "New Tab - Google Chrome"} <= set(shared[shared].index)
    assert 0.12 <= is_shared.mean() <= 0.35
    # On its own a shared window says little: its most common activity is mostly wrong...
    counts = df.groupby(["text", "step_name"]).size().sort_values(ascending=False)
    majority = counts.reset_index().drop_duplicates("text").set_index("text")["step_name"]
    right_alone = df["text"].map(majority) == df["step_name"]
    assert right_alone[is_shared].mean() < 0.4
    # ...but the nearest specific window before or after it in the day names the activity.
    specific = df["step_name"].where(~is_shared)
    before = specific.groupby(df["day"]).ffill()
    after = specific.groupby(df["day"]).bfill()
    truth = df["step_name"]
    assert (before == truth)[is_shared].mean() > 0.85
    assert ((before == truth) | (after == truth))[is_shared].mean() > 0.95
    # so a per-event classifier is capped, and context lifts the cap
    with_context = right_alone.where(~is_shared, before == truth)
    assert right_alone.mean() < 0.8 and with_context.mean() > right_alone.mean() + 0.1
    # the words of specific titles carry the activity
    assert _majority_share(df[~is_shared], "text") > 0.85


def test_focus_vocabulary_drifts_between_days(focus):
    _, df = focus
    days = df["day"].nunique()
    early, late = df[df["day"] < 0.75 * days], df[df["day"] >= 0.75 * days]
    # most windows of the last days were never seen before (new documents, threads, weeks)
    assert (~late["text"].isin(set(early["text"]))).mean() > 0.35

    def words(titles: pd.Series) -> set[str]:
        return set().union(*titles.str.lower().str.findall(r"[a-z][a-z0-9.-]+"))

    overlap = []
    for activity in df["step_name"].value_counts().index[:10]:
        a = df[df["step_name"] == activity]
        first = words(a[a["day"] < days / 4]["text"])
        last = words(a[a["day"] >= 3 * days / 4]["text"])
        if first and last:
            overlap.append(len(first & last) / len(first | last))
    assert len(overlap) >= 6 and pd.Series(overlap).median() < 0.6


def test_focus_scales_with_sessions(tmp_path):
    stats = generate(60, 1, tmp_path / "long.csv", profile="window-focus")
    df = pd.read_csv(tmp_path / "long.csv")
    assert stats["sessions"] == df["session_id"].nunique() == 60
    assert 25_000 <= len(df) <= 35_000
    assert 380 <= df.groupby("session_id").size().median() <= 520
    share = df["step_name"].value_counts(normalize=True)
    assert len(share) == 28 and 0.12 <= share.iloc[0] <= 0.15


def test_cli_generate_profile(tmp_path, capsys):
    out = tmp_path / "cli.csv"
    assert main(["generate", "--profile", "window-focus", "--sessions", "3", "--seed", "4",
                 "--out", str(out)]) == 0
    assert "in 3 sessions" in capsys.readouterr().out
    generate(3, 4, tmp_path / "api.csv", profile="window-focus")
    assert out.read_bytes() == (tmp_path / "api.csv").read_bytes()
    assert list(pd.read_csv(out).columns) == WF_COLUMNS
    # the default profile is still the default
    default = tmp_path / "default.csv"
    assert main(["generate", "--sessions", "50", "--seed", "7", "--out", str(default)]) == 0
    assert hashlib.sha256(default.read_bytes()).hexdigest() == DEFAULT_50_7_SHA256
    # screenshots exist only for the default profile: a one-line error, exit 2
    assert main(["generate", "--profile", "window-focus", "--images", str(tmp_path / "shots"),
                 "--out", str(tmp_path / "x.csv")]) == 2
    assert "no screenshots" in capsys.readouterr().err


def test_focus_hard_profile_has_titles_that_say_less_about_the_activity(focus, tmp_path):
    # the same days, runs and statistics, but windows borrowed from related activities and
    # shared windows come up more often: a title alone names the activity less often
    _, df = focus
    path = tmp_path / "hard.csv"
    seed = int(df["session_id"].iloc[0][2:].split("-")[0])
    stats = generate(None, seed, path, profile="window-focus-hard")
    hard = pd.read_csv(path)
    assert list(hard.columns[:7]) == WF_COLUMNS and stats["sessions"] == hard["session_id"].nunique() == 20
    assert 8_500 <= len(hard) <= 11_500 and hard["step_name"].nunique() == 28
    assert _majority_share(hard, "text") < _majority_share(df, "text") - 0.05
    with pytest.raises(ConfigError, match="no screenshots"):
        generate(2, 1, tmp_path / "x.csv", images_dir=tmp_path / "img", profile="window-focus-hard")


def test_the_cli_offers_every_profile_the_generator_has():
    # trainer.cli spells the choices out (importing the generator would cost every command
    # half a second of start-up): they must stay the generator's
    import argparse

    from trainer.cli import register
    from trainer.generate import PROFILES
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    gen = sub.choices["generate"]
    profile = next(a for a in gen._actions if a.dest == "profile")
    assert tuple(profile.choices) == PROFILES
