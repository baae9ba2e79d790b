"""The command line's front door (pipeline/cli/main.py)."""

import re

import pytest

from pipeline.cli.main import TOOLS, main


def test_help_lists_every_command_launch_included(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    for command in ["launch", "train", "predict", "doctor", "export", "check-config", "plan", "plot", *TOOLS]:
        assert re.search(rf"^    {command}\s", listed, re.M), command
