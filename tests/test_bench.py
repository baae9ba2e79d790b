"""The benchmark's statistics, table, goals and plot (the benchmark itself is run by hand: README)."""
import pytest

from pipeline.bench import aggregate, goals, markdown_table, plot, steady_state


def test_steady_state_skips_warmup_and_takes_the_median_step():
    steps = [{"time": 5.0, "wait": 1.0, "tokens": 100}] + [{"time": t, "wait": 0.01, "tokens": 640} for t in (0.2, 0.1, 0.9)]
    s = steady_state(steps, warmup=1, global_batch=32)
    assert s["step_time_s"] == 0.2  # the slow first step and the 0.9 s outlier do not count
    assert s["samples_per_s"] == pytest.approx(160) and s["tokens_per_s"] == pytest.approx(3200)
    assert s["data_wait_pct"] == pytest.approx(100 * 0.03 / 1.2)
    with pytest.raises(ValueError, match="none left after 4 warm-up steps"):
        steady_state(steps, warmup=4, global_batch=32)


def summary(sps, **extra):
    return {"samples_per_s": sps, "tokens_per_s": sps * 100, "step_time_s": 32 / sps, "data_wait_pct": 1.0,
            "startup_s": 10.0, "peak_mib": 600.0, **extra}


def test_ratios_are_paired_within_each_repetition_before_the_median():
    # Repetition 2 ran on a machine twice as slow: per-rep ratios stay 0.9 and 1.0, a ratio of medians would not.
    reps = [{"pipeline": summary(90), "reference": summary(100), "hf": summary(80)},
            {"pipeline": summary(50), "reference": summary(50), "hf": summary(45)},
            {"pipeline": summary(45), "reference": summary(50), "hf": summary(40)}]
    out = aggregate(reps)
    assert out["pipeline"]["vs_reference"] == pytest.approx(0.9)
    assert out["reference"]["vs_reference"] == 1.0
    assert out["pipeline"]["samples_per_s"] == 50
    assert out["pipeline"]["spread_pct"] == pytest.approx(100)


def test_table_rows_and_goal_lines(tmp_path):
    results = {(2, 4): aggregate([{"pipeline": summary(99), "reference": summary(100), "hf": summary(80, data_wait_pct=3.0)}]),
               (1, 1): aggregate([{"pipeline": summary(90, data_wait_pct=2.5), "reference": summary(100), "hf": summary(95)}])}
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| ZeRO | accum | stack | samples/s | tokens/s | step ms | × reference |")
    assert len(table) == 2 + 6 and table[2].startswith("| 1 | 1 | pipeline | 90.0 | 9000 | 356 | 0.900 |")
    assert table[5] == "| 2 | 4 | pipeline | 99.0 | 9900 | 323 | 0.990 | 0.0 | 10.0 | 1.00 | 600 |"
    lines = goals(results)
    assert lines[0] == ("ZeRO-1 accum 1: pipeline 0.900× reference, 0.947× HF Trainer, data wait 2.50%: "
                        "≥ 0.97× reference MISSED, ≥ HF Trainer MISSED, data wait < 2% MISSED")
    assert lines[1].endswith("≥ 0.97× reference met, ≥ HF Trainer met, data wait < 2% met")

    plot(results, tmp_path / "bench.png", "test")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
