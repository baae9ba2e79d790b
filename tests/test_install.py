"""What pip installs: ranges in setup.cfg (a cluster keeps its CUDA-matched torch), the tested set in
constraints.txt, and the two agree."""

import configparser

from helpers import REPO
from packaging.requirements import Requirement
from packaging.version import Version


def requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return {Requirement(line).name: Requirement(line) for line in lines}


def constraints() -> dict[str, Version]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): Version(version.strip()) for name, version in pins}


def test_install_requires_leaves_room_for_a_clusters_torch():
    for name in ("torch", "deepspeed", "transformers"):
        specifiers = requirements()[name].specifier
        assert not any(s.operator == "==" for s in specifiers), f"{name} is pinned: pip would replace a cluster's build"
    assert requirements()["torch"].specifier.contains("2.10.0")  # e.g. a cluster's CUDA 12.6 build


def test_every_tested_version_satisfies_install_requires():
    pins = constraints()
    for name, requirement in requirements().items():
        assert name in pins, f"{name} has no tested version in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt: {name}=={pins[name]} is outside {requirement}"
