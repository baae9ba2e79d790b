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


@pytest.mark.ranks
def test_the_installed_command_runs_from_the_users_directory_and_its_run_file_repeats_the_run(tmp_path):
    """`zero-pipeline launch` from a directory of one's own, every path relative to it: one training
    file with a held-out dev part, one's own DeepSpeed JSON, HF flags; then RUN_DIR/run.yaml again."""
    import json
    import shutil
    import subprocess
    from collections import Counter

    from helpers import REPO, SAMPLE, cheap, cpu_env, free_port, losses, note_launch, read_jsonl, require, write_jsonl

    require("zero-pipeline", install="pip install -e . (the console script)", why_root="")
    records = read_jsonl(SAMPLE / "train.jsonl")[:200]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "notes.jsonl", records)
    shutil.copy(REPO / "ds_configs" / "small_zero2.json", tmp_path / "my_ds.json")

    def zero_pipeline(*args):
        note_launch("zero-pipeline")
        command = ["zero-pipeline", *cheap(["launch", *args]), "--no-doctor", "--master-port", str(free_port())]
        result = subprocess.run(command, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    common = ["--max-steps", "4", "--max-length", "48", "--eval-every", "0", "--log-every", "1", "--output-dir", "out"]
    out = zero_pipeline(
        "--ds-config",
        "my_ds.json",
        "--train-file",
        "data/notes.jsonl",
        "--val-size",
        "0.2",
        "--learning-rate",
        "5e-4",
        "--weight-decay",
        "0.0",
        "--run-name",
        "first",
        *common,
    )
    run = tmp_path / "out" / "first"
    assert "no --hostfile: 2 ranks on this machine" in out and "lr 0.0005 (--learning-rate)" in out
    assert (run / "export" / "config.json").is_file() and "export (verified)" in out, out[-2000:]
    held_out = json.loads((run / "val_split.json").read_text())["dev_records"]
    labels = Counter(r["label"] for r in records)
    assert Counter(records[i - 1]["label"] for i in held_out) == {k: round(0.2 * n) for k, n in labels.items() if round(0.2 * n)}
    # The run file holds every option with absolute paths, and repeats the run exactly.
    again = zero_pipeline(str(run / "run.yaml"), "--run-name", "again")
    assert "lr 0.0005 (--learning-rate)" in again
    assert losses(tmp_path / "out" / "again") == losses(run) and len(losses(run)) == 4


@pytest.mark.ranks
def test_a_rank_imports_deepspeed_without_mlflow_and_can_still_track_with_it():
    """DeepSpeed's autotuner imports mlflow when it is installed; a rank's DeepSpeed import leaves it
    out (a new interpreter, as a rank starts), and mlflow still imports for a run that tracks with it."""
    import subprocess
    import sys

    from helpers import REPO, cpu_env

    code = (
        "import sys; from pipeline.core.dist import import_deepspeed; import_deepspeed(); "
        "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m); "
        "import mlflow; print('mlflow', mlflow.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("mlflow "), done.stderr[-2000:]


@pytest.mark.ranks
def test_the_launchers_runner_is_deepspeeds_own_without_mlflow():
    """`python -m pipeline.launch.runner`, as ./launch.sh starts DeepSpeed's runner: DeepSpeed's own
    main (its help), and none of mlflow's modules among those it imported (python -X importtime lists each)."""
    import subprocess
    import sys

    from helpers import REPO, RUNNER, cpu_env

    done = subprocess.run(
        [sys.executable, "-X", "importtime", *RUNNER[1:], "--help"],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert done.returncode == 0 and "DeepSpeed runner to help launch distributed multi-node" in done.stdout, done.stdout[-2000:]
    # `mlflow` itself is listed, refused at once (the guard's None in sys.modules); none of its 500 modules loads (the plain runner loads 508)
    assert "deepspeed.launcher.runner" in imported and not [name for name in imported if name.startswith("mlflow.")]
