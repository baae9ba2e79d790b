"""The package's rooms by layer: each room imports only rooms below it, and the runtime never imports
the tools. Every module of `pipeline/` is read with `ast`."""

import ast

import pytest
from helpers import REPO

PACKAGE = REPO / "pipeline"
# Lowest first: a module may import its own room and the rooms before it, never one after.
LAYERS = ("core", "data", "tasks", "checkpoint", "train", "launch", "cli")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts)


def room(module: str) -> str | None:
    """`pipeline.train.loop` -> "train"; the package's own files (__init__, __main__) are in none."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS + ("tools",) else None


def imported_modules(path, package_dir=PACKAGE) -> list[str]:
    """The `pipeline…` modules that the import statements of the file at `path` (in `package_dir`)
    name: relative ones resolved from its own package; `from X import name` counts X and X.name."""
    package = ["pipeline", *path.relative_to(package_dir).with_suffix("").parts[:-1]]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "pipeline" or n.startswith("pipeline.")]


def module_name(path) -> str:
    return ".".join(["pipeline", *path.relative_to(PACKAGE).with_suffix("").parts])


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_a_module_imports_no_room_above_its_own_and_never_the_tools(path):
    mine = room(module_name(path))
    rank = LAYERS.index(mine) if mine else len(LAYERS)
    above = [n for n in imported_modules(path) if room(n) == "tools" or (room(n) in LAYERS and LAYERS.index(room(n)) > rank)]
    assert not above, f"{module_name(path)} ({mine}) imports {above}: rooms import only rooms below them, never pipeline.tools"


def test_the_check_sees_every_spelling_of_an_import(tmp_path):
    copy = tmp_path / "pipeline" / "core" / "m.py"
    copy.parent.mkdir(parents=True)
    for source, expected in [
        ("import pipeline.tools.bench", "pipeline.tools.bench"),
        ("from pipeline.tools import comms", "pipeline.tools.comms"),
        ("from ..tools import audit", "pipeline.tools.audit"),
        ("from .. import train", "pipeline.train"),
        ("from ..train.loop import micro_step", "pipeline.train.loop"),
        ("def f():\n    from ..launch import doctor", "pipeline.launch.doctor"),
    ]:
        copy.write_text(source + "\n")
        found = imported_modules(copy, tmp_path / "pipeline")
        assert expected in found, (source, found)


def test_no_more_than_six_layers_of_rooms():
    """The longest chain of room imports (cli -> train -> checkpoint -> tasks -> data -> core) is at most 6."""
    edges = {r: set() for r in LAYERS}
    for path in MODULES:
        mine = room(module_name(path))
        if mine:
            edges[mine] |= {room(n) for n in imported_modules(path) if room(n) in LAYERS and room(n) != mine}

    def depth(r):
        return 1 + max((depth(below) for below in edges[r]), default=0)

    assert max(depth(r) for r in LAYERS) <= 6, {r: sorted(e) for r, e in edges.items()}


def test_the_command_line_imports_no_tool_at_module_level():
    """`python -m pipeline train` loads the command line: a tool is imported only inside the function that runs its command."""
    tree = ast.parse((PACKAGE / "cli" / "main.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n in tree.body and "tools" in (n.module or "")]


ALL_MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", ALL_MODULES, ids=[module_name(p) for p in ALL_MODULES])
def test_every_name_a_module_imports_from_the_package_exists(path):
    """Imports inside functions too (tools import lazily): a name moved elsewhere fails here, not in
    the middle of a run."""
    import importlib.util

    package = ["pipeline", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]]
    missing = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("pipeline")):
            base = (
                ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            module = importlib.import_module(base)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{base}.{alias.name}") is None:
                    missing.append(f"{base}.{alias.name} (line {node.lineno})")
    assert not missing, f"{module_name(path)} imports names that do not exist: {missing}"
