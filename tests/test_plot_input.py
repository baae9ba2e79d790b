"""`plot` on metrics.jsonl as an interrupted or running job leaves it (pipeline/cli/plot.py reads it
with train/runlog.py's reader, the one resume uses)."""

import json

from pipeline.cli.main import main


def write_metrics(run_dir, tail: str):
    rows = [{"step": step, "epoch": 0, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 1.5} for step in (1, 2, 3)]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail, encoding="utf-8")


def test_plot_drops_a_cut_last_line_with_a_warning(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, '{"step": 4, "epoch": 0, "lo')  # killed while writing step 4's row
    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl: dropped its incomplete last line" in out
    assert (run_dir / "metrics.png").stat().st_size > 0


def test_plot_names_an_unreadable_line_inside_the_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, '{"step": 4, "epoch": 0, "lo\n{"step": 5, "epoch": 0, "loss": 0.4, "lr": 0.001}\n')
    assert main(["plot", str(run_dir)]) == 2
    assert "metrics.jsonl: line 4 is not a JSON metrics record; repair or remove that line" in capsys.readouterr().err
    assert not (run_dir / "metrics.png").exists()
