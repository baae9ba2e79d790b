"""The launch file: a launch's resolved run, as it travels from `zero-pipeline launch` to every rank.

DeepSpeed's pdsh runner joins the ranks' command into one string for a shell on every node, with
the arguments as given (`deepspeed/launcher/multinode_runner.py`: raw, or in double quotes where
`$(...)` still runs) and every MLFLOW*/NCCL*/PYTHON* variable as `export KEY=VALUE`, which it also
logs and `ps` shows. So the user's options and the environment the ranks need do not go there:
the launcher writes them into this file (JSON, readable by the user alone) on the shared output
directory, and the ranks' command names only its path, which holds no character a shell interprets.
The file is data: the ranks read a config and environment values from it, nothing they run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from .base import ConfigError, unique_suffix
from .options import TrainConfig

# Characters a shell takes literally, and that DeepSpeed's runner passes on unquoted.
SHELL_PLAIN = re.compile(r"[\w@%+=:,./-]+")


def write_launch_file(directory: Path, command: str, cfg: TrainConfig, env: dict[str, str]) -> Path:
    """A new launch file in `directory` for `command` (train or pretrain), mode 0600 from its creation."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".launch-{unique_suffix()}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"command": command, "config": dataclasses.asdict(cfg), "env": env}, f, ensure_ascii=False)
    return path


def read_launch_file(path: str, command: str) -> TrainConfig:
    """The run a launch file holds; its environment values are set in this process first."""
    try:
        launch = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"launch file {path}: {e} (it is written by `zero-pipeline launch` and removed when the launch ends)")
    if launch.get("command") != command:
        raise ConfigError(f"launch file {path} is for `{launch.get('command')}`, not `{command}`")
    os.environ.update(launch["env"])
    return TrainConfig(**launch["config"])
