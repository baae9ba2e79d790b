"""The test tiers' own rules (helpers.py, conftest.py): an unmarked test cannot launch a process, and a
launched run's cheap defaults give way to a test's own options."""

import argparse

import helpers
import pytest

from pipeline import tasks
from pipeline.core.options import add_train_options


def test_a_test_without_a_ranks_or_cluster_mark_cannot_launch(request):
    assert helpers.current_test is request.node
    before = dict(helpers.LAUNCHES)
    with pytest.raises(pytest.fail.Exception, match="launches deepspeed but is not marked ranks or cluster"):
        helpers.deepspeed_command(["train"])
    assert helpers.LAUNCHES == before  # refused, not counted


@pytest.mark.ranks
def test_a_ranks_test_is_slow_too_so_the_quick_loop_leaves_it_out(request):
    assert request.node.get_closest_marker("slow")


def test_a_tests_own_baseline_and_tracker_options_win_over_the_cheap_defaults():
    parser = argparse.ArgumentParser()
    add_train_options(parser, {"task": tasks.names()})
    command = helpers.cheap(["train", "--baseline", "tfidf", "--max-steps", "2"])
    assert command[:5] == ["train", *helpers.CHEAP]
    given = parser.parse_args(command[1:])
    assert (given.baseline, given.report_to, given.max_steps) == ("tfidf", "none", 2)
    assert helpers.cheap(["run.yaml"])[1:] == helpers.CHEAP  # after a run file, whose options come first
