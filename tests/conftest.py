"""Fixtures for every test module: the shared training runs (fixtures_runs.py) and the clusters
(fixtures_cluster.py) and the MLflow tracking server (fixtures_tracking.py). Helpers that tests import are in helpers.py.

The hooks here keep the two tiers honest (setup.cfg lists the marks): a `ranks` or `cluster` test is
also `slow`, so `-m "not slow"` is the in-process tier; a test that launches a process without one of
those marks fails (helpers.note_launch); and the session ends with each tier's time and the count of
launched processes, also written as tiers.json beside `--junitxml`'s file."""

import json
import os
from pathlib import Path

import helpers
import pytest
from fixtures_cluster import cluster, slurm
from fixtures_runs import chunked_run, early_stopped, initial_model, multilabel_run, one_rank, small_data, uninterrupted
from fixtures_tracking import mlflow_server, tracked_run

__all__ = [
    "chunked_run",
    "cluster",
    "early_stopped",
    "initial_model",
    "mlflow_server",
    "multilabel_run",
    "one_rank",
    "slurm",
    "small_data",
    "tracked_run",
    "uninterrupted",
]


@pytest.fixture(autouse=True)
def keep_umask():
    """A run closes its process's umask (--file-access): an in-process run or launch must not pass it on
    to the tests after it, or to the processes they start."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


@pytest.fixture
def refuse(monkeypatch, capsys):
    """`refuse(*ARGV)`: `zero-pipeline launch ARGV` in this process, with CPU ranks' environment, which
    must stop with exit 2 (a ConfigError, or argparse's usage error) before the doctor or the runner
    starts a process: reaching either fails the test there. Returns (stdout, stderr)."""
    from pipeline.launch import doctor, launcher

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def reached(what):
        def stop(*args, **kwargs):
            pytest.fail(f"the launch reached {what} instead of being refused", pytrace=False)

        return stop

    monkeypatch.setattr(doctor, "check", reached("the doctor"))
    monkeypatch.setattr(launcher, "deepspeed_command", reached("the deepspeed runner"))
    monkeypatch.setattr(launcher, "slurm_command", reached("srun"))

    def run(*argv: str) -> tuple[str, str]:
        try:
            code = launcher.main(list(argv))
        except SystemExit as e:  # argparse's errors: the exit code the script returns
            code = e.code
        out = capsys.readouterr()
        assert code == 2, out.out + out.err
        return out.out, out.err

    return run


@pytest.fixture
def sigusr1_kept():
    """A run set up in this process installs its stop handler for SIGUSR1 (core.stop.StopRequests):
    pytest's own comes back after the test."""
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


TIERS = ("in-process", "slow", "ranks", "cluster")  # in-process: `-m "not slow"`
_durations = {tier: [0, 0.0] for tier in TIERS}  # tier: [tests, seconds of setup, call and teardown]


def tier(keywords) -> str:
    return next((t for t in reversed(TIERS[1:]) if t in keywords), "in-process")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("ranks") or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    helpers.current_test = item  # a session fixture's launch counts for the test that first needs it
    yield
    helpers.current_test = None


def pytest_runtest_logreport(report):
    counts = _durations[tier(report.keywords)]
    counts[0] += report.when == "call"
    counts[1] += report.duration


def pytest_terminal_summary(terminalreporter, config):
    summary = {
        "tiers": {t: {"tests": n, "seconds": round(s, 1)} for t, (n, s) in _durations.items()},
        "launched": dict(sorted(helpers.LAUNCHES.items())),
    }
    terminalreporter.write_sep("-", "tiers")
    for name, row in summary["tiers"].items():
        terminalreporter.write_line(f"{name:>10}: {row['tests']:4d} tests {row['seconds']:8.1f} s")
    launched = ", ".join(f"{kind} {n}" for kind, n in summary["launched"].items()) or "none"
    terminalreporter.write_line(f"  launched: {sum(helpers.LAUNCHES.values())} processes ({launched})")
    if config.option.xmlpath:
        Path(config.option.xmlpath).with_name("tiers.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
