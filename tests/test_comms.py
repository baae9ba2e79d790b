"""Where accumulation saves communication: measured with DeepSpeed's comms logger on 2 CPU ranks."""

import pytest

from pipeline.tools.comms import markdown, measure_all, steady

pytestmark = pytest.mark.ranks  # launches 2 ranks


def test_stage_1_reduces_once_per_window_stage_2_once_per_micro_batch():
    results = measure_all("ds_configs/small_zero2.json", stages=[1, 2], accum=[1, 2, 4], ranks=2, steps=2)
    reduce = {(r["stage"], r["accum"]): steady(r)["all_reduce"] for r in results}  # (calls, bytes) per optimizer step

    # ZeRO-1: the gradients are all-reduced at the window's boundary only, whatever the accumulation.
    assert reduce[1, 1] == reduce[1, 2] == reduce[1, 4]
    # ZeRO-2: every micro-batch's gradients are reduced, so calls and bytes grow by the same amount per
    # extra micro-batch (one gradient reduction each), on top of a fixed per-step part.
    for i in (0, 1):
        per_micro_batch = reduce[2, 2][i] - reduce[2, 1][i]
        assert per_micro_batch > 0 and reduce[2, 4][i] - reduce[2, 2][i] == 2 * per_micro_batch, reduce
    assert reduce[2, 1] == reduce[1, 1]  # without accumulation the two stages communicate alike

    table = markdown(results, ranks=2)
    assert table.count("\n| 2 | 4 | ") == 1 and "all_reduce: calls, MB" in table
