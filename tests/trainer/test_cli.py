"""The ``tagger`` command line as a newcomer meets it: ``--version``, ``--help`` everywhere,
``-q``/``-v`` on either side of the command, and bad values refused in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tagger.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tagger {version('tagger')}"


def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_of_every_command_says_what_it_is():
    parser, commands = subcommands()
    assert "``" not in parser.format_help()   # no reST markup in what a terminal shows
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sp in commands.items() for a in sp._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"options without help text: {missing}"


def test_help_shows_defaults():
    _, commands = subcommands()
    assert "default 1000" in commands["generate"].format_help()
    assert "(default: 0)" in commands["generate"].format_help()
    assert "(default: 60)" in commands["demo"].format_help()
    stack = commands["stack"].format_help()
    for action in ("up", "down", "status"):
        assert f"\n  {action}  " in stack   # each action explained


def test_quiet_and_verbose_work_after_the_command_too():
    parser = build_parser()
    for argv in (["-q", "-v", "tail"], ["tail", "-q", "-v"], ["-q", "tail", "-v"]):
        args = parser.parse_args(argv)
        assert args.quiet and args.verbose, argv
    args = parser.parse_args(["tail"])
    assert not args.quiet and not args.verbose


def test_a_bad_value_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "tagger.cli", "generate", "--seed", "-1", "--out", "x.csv"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == ("tagger generate: error: argument --seed: "
                                                   "expected an integer >= 0, got -1")


@pytest.mark.parametrize("command,option", [
    (["train", "--data", "LOG", "--out", "{x}/model"], "--out"),
    (["evaluate", "--model", "MODEL", "--data", "LOG", "--json", "{x}/eval.json"], "--json"),
    (["predict", "--model", "MODEL", "--data", "LOG", "--out", "{x}/pred.csv"], "--out"),
    (["generate", "--sessions", "3", "--out", "{x}/gen.csv"], "--out"),
    (["generate", "--sessions", "3", "--out", "OK/gen.csv", "--images", "{x}/shots"], "--images"),
    (["cv", "--data", "LOG", "--json", "OK/cv.json", "--keep", "{x}/folds"], "--keep"),
    (["bench", "--quick", "--json", "{x}/bench.json"], "--json"),
    (["bench", "--quick", "--out", "{x}/bench"], "--out"),
    (["chaos", "--quick", "--workdir", "{x}/chaos"], "--workdir"),
    (["demo", "--json", "{x}/demo.json", "--workdir", "OK/demo"], "--json"),
])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, command, option):
    # "{x}" is a file, so nothing can be written under it: the command says so and which
    # option, before reading, training or generating anything (no traceback at the end)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = REPO_ROOT / "tests" / "fixtures" / "artifact_v0_1"
    args = [a.replace("{x}", str(blocker)).replace("LOG", str(tmp_path / "missing.csv"))
            .replace("MODEL", str(model)).replace("OK", str(tmp_path / "ok")) for a in command]
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    target = next(a for a in args if a.startswith(str(blocker)))
    assert err == [f"tagger {command[0]}: error: {option} {target}: {blocker} is a file, so no folder "
                   "can be made there"]
    assert not (tmp_path / "ok").exists()      # nothing was written


def test_a_folder_where_a_file_is_wanted_and_a_file_where_a_folder_is(tmp_path, capsys):
    assert main(["-q", "predict", "--model", "M", "--data", "D", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"tagger predict: error: --out {tmp_path}: is a folder; name a file"
    f = tmp_path / "m"
    f.write_text("")
    assert main(["-q", "train", "--data", "D", "--out", str(f)]) == 2
    assert capsys.readouterr().err.strip() == f"tagger train: error: --out {f}: is a file; name a folder"
