"""The runtime never imports the tools: every `pipeline/*.py` but the command line, read with `ast`."""

import ast

import pytest
from conftest import REPO

RUNTIME = sorted(p for p in (REPO / "pipeline").glob("*.py") if p.name != "__main__.py")


def tool_imports(nodes) -> list[str]:
    """The `pipeline.tools…` modules that the import statements among `nodes` name (relative ones
    resolved from a module of `pipeline`)."""
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "pipeline" + ("." + node.module if node.module else "") if node.level else node.module
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from . import tools` too
    return [n for n in names if n == "pipeline.tools" or n.startswith("pipeline.tools.")]


def every_import(path) -> list[str]:
    return tool_imports(ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))))


@pytest.mark.parametrize("path", RUNTIME, ids=[p.name for p in RUNTIME])
def test_runtime_module_does_not_import_the_tools(path):
    assert not every_import(path), f"{path.name} imports {every_import(path)}: the runtime must not depend on pipeline.tools"


def test_the_check_sees_every_spelling_of_the_import(tmp_path):
    module = tmp_path / "m.py"
    for source in [
        "import pipeline.tools.bench",
        "from pipeline.tools import comms",
        "from .tools import audit",
        "from . import tools",
        "from .tools.common import free_port",
        "def f():\n    from .tools import bench",
    ]:
        module.write_text(source + "\n")
        assert every_import(module), source
    module.write_text("from . import dist\nfrom .train import micro_step\nimport toolz\nfrom pipeline import tools_x\n")
    assert not every_import(module)


def test_the_command_line_imports_no_tool_at_module_level():
    """`python -m pipeline train` loads __main__: a tool is imported only inside the function that runs its command."""
    tree = ast.parse((REPO / "pipeline" / "__main__.py").read_text(encoding="utf-8"))
    assert not tool_imports(tree.body)
