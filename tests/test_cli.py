"""The command line's front door (pipeline/cli/main.py)."""

import re

import pytest

from pipeline import tasks
from pipeline.cli.main import TOOLS, main


def test_help_lists_every_command_launch_included(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    for command in ["launch", "train", "predict", "doctor", "export", "check-config", "plan", "plot", *TOOLS]:
        assert re.search(rf"^    {command}\s", listed, re.M), command


def test_a_misspelt_option_gets_the_nearest_one(capsys):
    from pipeline.launch.launcher import parse_args

    with pytest.raises(SystemExit) as done:
        main(["train", "--epoch", "3"])
    assert done.value.code == 2
    assert "unrecognized arguments: --epoch 3 (--epoch: did you mean --epochs?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--max_step", "3", "--hostfile", "h"])  # ./launch.sh: training options are checked there too
    assert "--max_step: did you mean --max_steps?" in capsys.readouterr().err


def test_train_help_shows_each_options_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(choices: {', '.join(tasks.names())}; default: 'single_label')" in shown  # every registered task
    assert "(choices: head, tail, head+tail; default: 'head')" in shown
    assert "(choices: char, wordpiece; default: 'char')" in shown
