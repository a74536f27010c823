"""The generated logs have the properties DATA.md describes, and are reproducible."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from trainer.generate import COLUMNS, OUT_OF_PROCESS, STEPS, generate

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
