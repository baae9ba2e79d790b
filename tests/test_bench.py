"""The benchmark's statistics, table, goals and plot (the benchmark itself is run by hand: docs/benchmarks.md)."""

import json
import math
from types import SimpleNamespace

import pytest
from helpers import REPO

from pipeline.tools.bench import (
    aggregate,
    goals,
    markdown_table,
    paired_ratio,
    plot,
    steady_state,
    steps_per_run,
    verdict,
    write_config,
)


def test_steady_state_skips_warmup_and_takes_the_median_step():
    steps = [{"time": 5.0, "wait": 1.0, "tokens": 100}] + [{"time": t, "wait": 0.01, "tokens": 640} for t in (0.2, 0.1, 0.9)]
    s = steady_state(steps, warmup=1, global_batch=32)
    assert s["step_time_s"] == 0.2  # the slow first step and the 0.9 s outlier do not count
    assert s["samples_per_s"] == pytest.approx(160) and s["tokens_per_s"] == pytest.approx(3200)
    assert s["data_wait_pct"] == pytest.approx(100 * 0.03 / 1.2)
    with pytest.raises(ValueError, match="none left after 4 warm-up steps"):
        steady_state(steps, warmup=4, global_batch=32)


def summary(sps, **extra):
    return {
        "samples_per_s": sps,
        "tokens_per_s": sps * 100,
        "step_time_s": 32 / sps,
        "data_wait_pct": 1.0,
        "startup_s": 10.0,
        "peak_mib": 600.0,
        **extra,
    }


def test_ratios_are_paired_within_each_repetition():
    # Repetition 2 ran on a machine twice as slow: per-rep ratios stay 0.9 and 1.0, a ratio of medians would not.
    reps = [
        {"pipeline": summary(90), "reference": summary(100), "hf": summary(80)},
        {"pipeline": summary(50), "reference": summary(50), "hf": summary(45)},
        {"pipeline": summary(45), "reference": summary(50), "hf": summary(40)},
    ]
    out = aggregate(reps)
    ratio = out["pipeline"]["vs_reference"]
    assert ratio["ratio"] == pytest.approx(0.9) and ratio["pairs"] == 3
    assert math.isnan(ratio["low"]) and math.isnan(ratio["high"])  # 3 pairs cannot bound a median at 95%
    assert out["pipeline"]["vs_hf"]["ratio"] == pytest.approx(1.125)  # of 1.125, 1.111, 1.125
    assert out["reference"]["vs_reference"]["ratio"] == 1.0
    assert out["pipeline"]["samples_per_s"] == 50
    assert out["pipeline"]["spread_pct"] == pytest.approx(100)


def ratios(*values):
    return paired_ratio([{"pipeline": summary(100 * v), "reference": summary(100)} for v in values], "pipeline", "reference")


def test_the_interval_is_the_sign_tests_order_statistics():
    r = ratios(*(0.90 + 0.01 * i for i in range(20)))  # 20 pairs: the 6th smallest and 6th largest, 95.9%
    assert r["ratio"] == pytest.approx(0.995) and r["low"] == pytest.approx(0.95) and r["high"] == pytest.approx(1.04)
    r = ratios(1.0, 1.1, 0.9, 1.05, 0.95, 1.2)  # 6 pairs, the fewest with a 95% interval: the extremes, 96.9%
    assert (r["low"], r["high"]) == (pytest.approx(0.9), pytest.approx(1.2))
    assert math.isnan(ratios(1.0, 1.1, 0.9, 1.05, 0.95)["low"])
    # A pair measured across a sudden change of the machine's speed moves the median little.
    assert ratios(*[1.0] * 10, 0.5)["ratio"] == 1.0


def test_a_goal_is_decided_only_when_the_whole_interval_agrees():
    assert verdict(ratios(1.00, 0.99, 1.01, 1.00, 0.98, 1.02), 0.97) == "met"
    assert verdict(ratios(0.90, 0.91, 0.92, 0.90, 0.93, 0.89), 0.97) == "MISSED"
    assert verdict(ratios(0.80, 1.20, 1.00, 0.90, 1.10, 1.00), 0.97) == "not settled"  # the median is above, the noise too wide
    assert verdict(ratios(0.99, 1.00, 1.01), 0.97) == "not settled"  # too few pairs for an interval
    # More pairs of the same noise narrow the interval until it decides.
    assert verdict(ratios(*[0.95, 1.00, 1.07] * 2), 0.97) == "not settled"
    assert verdict(ratios(*[0.95, 1.00, 1.07] * 15), 0.97) == "met"


def test_steps_per_run_span_enough_micro_batches():
    args = SimpleNamespace(steps=12, warmup=3, min_micro_batches=48)
    assert [steps_per_run(args, a) for a in (1, 2, 4, 8, 16)] == [51, 27, 15, 12, 12]


def test_every_stack_gets_a_config_of_numbers_from_a_shipped_one(tmp_path):
    """The shipped configs leave the micro batch, optimizer and schedule "auto" and state a global
    batch; a sweep fixes the micro batch and accumulation instead and fills the rest as a run would."""
    args = SimpleNamespace(
        ds_config="ds_configs/small_zero2.json", micro_batch=16, ranks=2, steps=10, warmup=2, min_micro_batches=48
    )
    ds = json.loads(open(write_config(args, tmp_path, stage=2, accum=2)).read())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (16, 2, 64)
    assert ds["zero_optimization"]["stage"] == 2
    params = ds["scheduler"]["params"]
    assert (params["total_num_steps"], params["warmup_num_steps"]) == (26, math.ceil(0.1 * 26))
    assert "auto" not in json.dumps(ds)


def test_table_rows_and_goal_lines(tmp_path):
    results = {
        (2, 4): aggregate(
            [
                {"pipeline": summary(99), "reference": summary(100), "hf": summary(80, data_wait_pct=3.0)},
                {"pipeline": summary(100), "reference": summary(100), "hf": summary(80)},
            ]
        ),
        (1, 1): aggregate([{"pipeline": summary(90, data_wait_pct=2.5), "reference": summary(100), "hf": summary(95)}]),
    }
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| ZeRO | accum | stack | samples/s | tokens/s | step ms | × reference | padding eff. |")
    assert len(table) == 2 + 6 and table[2].startswith("| 1 | 1 | pipeline | 90.0 | 9000 | 356 | 0.900 |")
    assert table[5] == "| 2 | 4 | pipeline | 99.5 | 9950 | 322 | 0.995 | nan | 1.0 | 10.0 | 1.00 | 600 |"  # no padding counted
    pooled = {
        "reference": {"ratio": 0.98, "low": 0.975, "high": 0.985, "pairs": 3},
        "hf": {"ratio": 1.2, "low": 0.9, "high": 1.5, "pairs": 3},
    }
    lines = goals(results, pooled)
    assert lines[0] == (
        "ZeRO-1 accum 1: pipeline 0.900× reference (too few pairs (1) for a 95% CI): "
        "≥ 0.97× reference not settled; 0.947× HF Trainer (too few pairs (1) for a 95% CI): "
        "≥ HF Trainer not settled; data wait 2.50%: < 2% MISSED"
    )
    assert lines[1] == (
        "ZeRO-2 accum 4: pipeline 0.995× reference (too few pairs (2) for a 95% CI): "
        "≥ 0.97× reference not settled; 1.244× HF Trainer (too few pairs (2) for a 95% CI): "
        "≥ HF Trainer not settled; data wait 1.00%: < 2% met"
    )
    assert lines[2] == (
        "All combinations, 3 paired runs: pipeline 0.980× reference (95% CI 0.975–0.985): ≥ 0.97× reference met; "
        "1.200× HF Trainer (95% CI 0.900–1.500): ≥ HF Trainer not settled"
    )

    plot(results, tmp_path / "bench.png", "test")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ranks
def test_data_preparation_benchmark_reports_cold_and_warm_numbers(tmp_path):
    """bench_data end to end on 100 generated records: a cold preparation in its own process (time,
    peak RSS) and a warm 2-rank start that reaches its first step through the cache it built."""
    import json
    import subprocess
    import sys

    from helpers import cpu_env, note_launch

    note_launch("bench_data")
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench_data", "--records", "100", "--out", str(tmp_path), "--max-length", "32"],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "result-100.json").read_text())
    assert result["records"] == 100 and sum(1 for _ in open(tmp_path / "train-100.jsonl", encoding="utf-8")) == 100
    assert result["cold"]["seconds"] > 0 and 0 < result["cold"]["peak_rss_bytes"] < 4 * 2**30
    assert 0 < result["warm_first_step_seconds"] < 600
    assert "cold preparation:" in run.stdout and "warm start:" in run.stdout
