"""What the report's pictures and summary show a reader: tiny AURCs stay visible, and a
session timeline draws every event's first, revised and final labels."""

from __future__ import annotations

from PIL import Image

from trainer.report import (fmt_small, format_summary, pick_timeline_sessions, plot_session_timeline,
                            session_timeline, timeline_title, write_timelines)


def test_a_small_aurc_is_not_shown_as_zero():
    assert fmt_small(0.00031) == "3.1e-04"
    assert fmt_small(0.0) == "0.000" and fmt_small(0.123) == "0.123" and fmt_small(None) == "n/a"
    text = format_summary({"offline": {"token_accuracy": 0.99, "macro_f1": 0.99, "aurc": 0.00031}})
    assert "AURC 3.1e-04" in text


def history():
    # four events: a first label revised once, an abstention that resolves, a wrong final,
    # and one still abstained at the end
    times = [100.0, 101.5, 103.0, 110.0]
    names = ["Read: a", "Write: b", "Action: c", "Read: d"]
    gold = ["Paperwork", "Paperwork", "Email Customer", "Additional Fees"]
    emissions = [(0, "Look Up Customer Account"), (1, None), (0, "Paperwork"), (2, "Paperwork"),
                 (1, "Paperwork"), (3, None), (0, "Paperwork"), (2, "Paperwork"), (3, None)]
    return session_timeline(times, names, emissions, gold)


def test_session_timeline_keeps_each_events_labels_in_order():
    events = history()
    assert [ev["t"] for ev in events] == [0.0, 1.5, 3.0, 10.0]
    assert events[0]["labels"] == ["Look Up Customer Account", "Paperwork", "Paperwork"]
    assert events[1]["labels"] == [None, "Paperwork"]
    assert events[3]["labels"] == [None, None]
    title = timeline_title("s-1", events)
    assert "4 events" in title and "2 label changes" in title and "final 0.50" in title


def test_timeline_png_is_written(tmp_path):
    path = plot_session_timeline(history(), tmp_path / "timeline_s-1.png", "Session s-1")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 200
    # events without any label yet and no truth still draw
    bare = session_timeline([0.0, 1.0], ["a", "b"], [(0, "X")])
    assert plot_session_timeline(bare, tmp_path / "bare.png", final_seen=False).exists()


def test_a_few_sessions_are_drawn_first_one_and_the_most_revised(tmp_path):
    calm = session_timeline([0.0], ["a"], [(0, "X"), (0, "X")])
    busy = history()
    chosen = pick_timeline_sessions({"first": calm, "calm": calm, "busy": busy}, k=2)
    assert chosen == ["first", "busy"]
    paths = write_timelines({"s/1": busy, "calm": calm}, tmp_path, k=3)
    assert sorted(p.name for p in paths) == ["timeline_calm.png", "timeline_s_1.png"]
