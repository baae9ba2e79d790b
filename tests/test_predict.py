import json
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.predict import predict

from conftest import REPO, cpu_env


@pytest.mark.slow
def test_predict_from_stdin_and_txt_file_agree(initial_model, tmp_path):
    texts = ["主诉：发热3天，咳嗽。", "主诉：胸痛2小时。"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    from_stdin = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(initial_model)], input="\n".join(texts),
                                cwd=REPO, env=cpu_env(), capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in from_stdin.splitlines()]
    assert rows == predict(str(initial_model), texts)
    from_file = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(initial_model), "--input",
                                str(tmp_path / "in.txt")], cwd=REPO, env=cpu_env(), capture_output=True, text=True, check=True)
    assert from_file.stdout == from_stdin
    assert all(set(r["probabilities"]) == set(json.loads((initial_model / "config.json").read_text())["label2id"]) for r in rows)


def test_predict_refuses_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ConfigError, match="not an exported model"):
        predict(str(tmp_path), ["x"])
