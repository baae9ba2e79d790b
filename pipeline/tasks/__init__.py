"""Tasks, registered by name: every module of this package that calls `base.register` is one.

`get(name)` is the task of `--task NAME` (an unknown name is refused, listing the known ones);
`by_problem_type` finds an export's task from its config.json.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..core.base import ConfigError
from .base import REGISTRY, WEIGHT_EXPECTED, Task, option_error, read_label_values, valid_weight

# Importing each module registers its task: a new task is a new file here, nothing else.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get(name: str) -> Task:
    """The task registered as `name`."""
    if name not in REGISTRY:
        raise option_error("task", name, " or ".join(sorted(REGISTRY)))
    return REGISTRY[name]


def resolve(cfg) -> Task:
    """The task of a (checked) TrainConfig, after checking the options that depend on it: the best
    metric is one of its metrics, the label options are ones it takes, a class-weights file parses.
    Called once at each edge (the launcher, check-config, the run's setup), before any process group."""
    task = get(cfg.task)
    if cfg.best_metric not in ("", *task.metric_names):
        raise option_error("best_metric", cfg.best_metric, f"{' or '.join(task.metric_names)} (for task {task.name})")
    if cfg.text_file and not task.pretraining:
        raise option_error("text_file", cfg.text_file, f"unset with task {task.name} (text files are what pretrain reads)")
    task.check_options(cfg)
    if cfg.class_weights not in ("none", "balanced"):
        if not cfg.class_weights.endswith(".json"):
            raise option_error("class_weights", cfg.class_weights, "none, balanced or a .json file {label: weight}")
        read_label_values(cfg.class_weights, "--class-weights", valid_weight, WEIGHT_EXPECTED)
    return task


def names() -> list[str]:
    return sorted(REGISTRY)


def all_metric_names() -> tuple[str, ...]:
    """Every registered task's summary metrics, each once (what `plot` may draw)."""
    return tuple(dict.fromkeys(name for task in REGISTRY.values() for name in task.metric_names))


def by_problem_type(problem_type: str | None, where: str = "model") -> Task:
    """The task of a saved model, from its config's problem_type; a config without one (a base model,
    an older export) is single-label. A problem_type no task registers is refused: `where` names the
    model in the error."""
    if problem_type is None:
        return REGISTRY["single_label"]
    for task in REGISTRY.values():
        if task.problem_type == problem_type:
            return task
    known = " or ".join(sorted(task.problem_type for task in REGISTRY.values()))
    raise ConfigError(f"{where}: config.json has problem_type {problem_type!r}, which no task registers (known: {known})")
