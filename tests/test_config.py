"""The training options and JSON files of them (pipeline/core/options.py, pipeline/core/base.py)."""

import json
import os
from pathlib import Path

import pytest

from pipeline.core.base import ConfigError, load_json
from pipeline.core.options import TrainConfig


def test_json_syntax_error_reports_line_and_column(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"ds\.json: JSON syntax error at line 3, column"):
        load_json(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_json(tmp_path / "missing.json")


def test_train_config_checks_types_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="'epochs' = 'two', expected int"):
        TrainConfig(epochs="two")
    with pytest.raises(ConfigError, match="'precision' = 'fp8'"):
        TrainConfig(precision="fp8")
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps({"epochs": 3, "max_lenght": 128}))
    with pytest.raises(ConfigError, match=r"unknown key 'max_lenght' \(did you mean 'max_length'\?\)"):
        TrainConfig.from_sources(str(cfg_file))
    cfg_file.write_text(json.dumps({"epochs": 3}))
    assert TrainConfig.from_sources(str(cfg_file), {"seed": 7}).epochs == 3


def test_vocabulary_and_early_stopping_options_are_checked():
    with pytest.raises(ConfigError, match="'vocabulary' = 'bpe', expected char or wordpiece"):
        TrainConfig(vocabulary="bpe")
    with pytest.raises(ConfigError, match="'early_stopping_patience' = 3, expected 0 unless best_metric is set"):
        TrainConfig(early_stopping_patience=3)
    with pytest.raises(ConfigError, match="'early_stopping_patience' = -1, expected >= 0"):
        TrainConfig(early_stopping_patience=-1, best_metric="macro_f1", eval_every=5, save_every=5)
    assert (
        TrainConfig(early_stopping_patience=2, best_metric="macro_f1", eval_every=5, save_every=10).early_stopping_patience == 2
    )


def test_paths_are_made_absolute_once_and_words_stay_words(tmp_path, monkeypatch):
    """The launcher resolves every path against the directory it runs in (the ranks may start elsewhere),
    and run.yaml repeats the run from anywhere: text_file's comma-separated files each, the JSON files
    threshold and class_weights may name, a checkpoint to resume; per-label, balanced, auto stay words."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(
        task="masked_lm", text_file="a.txt, notes/b.txt", output_dir="runs", cache_dir="~/cache", class_weights="w.json"
    ).with_absolute_paths()
    assert cfg.text_file == f"{tmp_path / 'a.txt'},{tmp_path / 'notes' / 'b.txt'}"
    assert (cfg.output_dir, cfg.class_weights) == (str(tmp_path / "runs"), str(tmp_path / "w.json"))
    assert cfg.cache_dir == os.path.expanduser("~/cache") and os.path.isabs(cfg.cache_dir)
    assert TrainConfig(resume="runs/r/checkpoints/step-4").with_absolute_paths().resume == str(
        tmp_path / "runs/r/checkpoints/step-4"
    )
    words = TrainConfig(resume="auto", threshold="per-label", class_weights="balanced", output_dir="/abs").with_absolute_paths()
    assert (words.resume, words.threshold, words.class_weights, words.output_dir) == ("auto", "per-label", "balanced", "/abs")
    assert cfg.run_file()["text_file"] == cfg.text_file and "resume" not in TrainConfig(resume="auto").run_file()


def test_config_files_that_are_not_utf8_are_refused_naming_file_line_and_utf8(tmp_path):
    """A run file, DeepSpeed JSON, hostfile or env file saved as GBK (a Chinese comment, a Chinese
    run name) is one message naming the file and line, not a UnicodeDecodeError traceback; the same
    file saved as UTF-8 is read."""
    from pipeline.launch.hosts import read_hostfile
    from pipeline.launch.launcher import read_env_file

    cases = [  # file, its text, the line with the first non-ASCII byte, how the launch reads it
        ("run.yaml", "# 胸痛分诊\nepochs: 1\n", 1, TrainConfig.from_sources),
        ("run.json", '{\n  "run_name": "胸痛"\n}\n', 2, TrainConfig.from_sources),
        ("ds.json", '{\n  "train_batch_size": 8\n, "comment": "八卡"}\n', 3, load_json),
        ("hostfile", "# 二号机房\nnode-1 slots=1\n", 1, read_hostfile),
        ("nodes.env", "# 代理\nHTTPS_PROXY=http://proxy:3128\n", 1, lambda path: read_env_file(Path(path))),
    ]
    for name, text, line, read in cases:
        path = tmp_path / name
        path.write_bytes(text.encode("gb18030"))
        with pytest.raises(ConfigError) as e:
            read(str(path))
        assert str(e.value).startswith(f"{path}: line {line}: not UTF-8 text (byte 0x")
        assert "configuration files must be UTF-8" in str(e.value)
        path.write_text(text, encoding="utf-8")
        read(str(path))


def test_a_run_file_reads_2e_5_as_a_number_for_train_and_launch_alike(tmp_path):
    """PyYAML (YAML 1.1) takes 2e-5 and 1.0e-8 for strings; JSON, argparse and DeepSpeed read numbers.
    `train --config` and `launch` read the same file through read_run_file: both get the numbers."""
    from pipeline.launch.launcher import parse_args

    run_file = tmp_path / "run.yaml"
    run_file.write_text('learning_rate: 2e-5\nadam_epsilon: 1.0e-8\nweight_decay: 1E2\nrun_name: "3e5"\n', encoding="utf-8")
    cfg = TrainConfig.from_sources(str(run_file))
    assert (cfg.learning_rate, cfg.adam_epsilon, cfg.weight_decay, cfg.run_name) == (2e-5, 1e-8, 100.0, "3e5")
    launched = parse_args([str(run_file)]).train
    assert (launched.learning_rate, launched.adam_epsilon, launched.weight_decay) == (2e-5, 1e-8, 100.0)


def test_a_run_name_is_a_name_not_a_path():
    for path in ("/tmp/elsewhere", "../colleague", "..", ".", "a/b", "runs/"):
        with pytest.raises(ConfigError, match=r"'run_name' = .*expected a name, not a path \(no '/', not '..'\)"):
            TrainConfig(run_name=path)
    for name in ("exp-1", "x$(touch PWNED)", "a..b", "胸痛 分诊", ".hidden"):  # shell characters are harmless in a name
        assert TrainConfig(run_name=name).run_name == name


def test_concurrent_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """write_text's temporary name is host-pid-random: writers in one process (threads), in several,
    or on several hosts of a shared file system (the same pid elsewhere) never replace each other's."""
    import threading

    from pipeline.core.base import unique_suffix, write_text

    assert unique_suffix() != unique_suffix()
    path, errors = tmp_path / "state.json", []

    def writer(text):
        try:
            for _ in range(300):
                write_text(path, text)
        except OSError as e:
            errors.append(e)

    texts = ["a" * 100_000, "b" * 100_000]
    threads = [threading.Thread(target=writer, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and path.read_text(encoding="utf-8") in texts
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
