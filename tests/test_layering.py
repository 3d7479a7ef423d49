"""The import layering of docs/DESIGN.md §3b, checked on the source with ``ast`` (every import
statement, including those inside functions and ``TYPE_CHECKING`` blocks):

* engine (everything in ``mmspec/`` outside ``app/``, ``training/``, ``data/`` and ``assets/``, plus
  ``kernels/``): the standard library, torch, numpy, safetensors, tqdm, triton and other engine
  modules only. ``mmspec/__init__.py`` may import pipelines lazily, inside a function (e.g. a module
  ``__getattr__``).
* pipelines (``pipelines/``): the engine and third-party libraries, never the application layer,
  the training recipes, the datasets or gradio.
* training recipes and datasets (``mmspec/training/``, ``mmspec/data/``): anything but the
  application layer.
* application (``mmspec/app/``): anything.

Files are classified by the folder rules above, so new engine modules (``mmspec/loops/``, ...) are
checked without being listed here. Within and across layers, modules import each other without
cycles (imports under ``if TYPE_CHECKING:`` aside): e.g. the CLI and the demos share helpers through
a third module instead of importing each other.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source folders and the package name each is installed as (pyproject.toml's package-dir).
SOURCE_DIRS = {"mmspec": "mmspec", "pipelines": "mmspec.pipelines", "kernels": "mmspec.kernels"}

ENGINE, PIPELINES, TRAINING, APP = "engine", "pipelines", "training/data", "application"
#: Third-party distributions the engine may import (beside the standard library).
ENGINE_THIRD_PARTY = {"torch", "numpy", "safetensors", "tqdm", "triton"}
#: Subpackages of mmspec with their own layer (everything else in mmspec is the engine).
SUBPACKAGE_LAYERS = {"pipelines": PIPELINES, "kernels": ENGINE, "app": APP, "training": TRAINING, "data": TRAINING}
#: What each layer must not import: internal layers, and third-party top-level names.
FORBIDDEN_LAYERS = {ENGINE: {PIPELINES, TRAINING, APP}, PIPELINES: {TRAINING, APP}, TRAINING: {APP}, APP: set()}
FORBIDDEN_THIRD_PARTY = {PIPELINES: {"gradio"}}


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the repository root
    line: int
    module: str  # absolute dotted name (an imported name that is a module is included, e.g. mmspec.app)
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    """Installed dotted name of a source file (``pipelines/vlm/targets.py`` -> ``mmspec.pipelines.vlm.targets``)."""
    rel = path.relative_to(ROOT)
    parts = [SOURCE_DIRS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of an mmspec module; None for anything outside mmspec."""
    parts = module.split(".")
    if parts[0] != "mmspec":
        return None
    if len(parts) > 1 and parts[1] in SUBPACKAGE_LAYERS:
        return SUBPACKAGE_LAYERS[parts[1]]
    return ENGINE


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def source_files() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "assets" not in path.relative_to(ROOT).parts:
                files.append(path)
    return files


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import statement of a file, resolved to absolute module names."""
    source = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = [
        (n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    type_blocks = [
        (n.body[0].lineno, n.body[-1].end_lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and _is_type_checking(n.test)
    ]
    modules = {module_name(p) for p in source_files()}

    def nested(node: ast.AST) -> bool:
        return any(start < node.lineno <= end for start, end in functions)

    def type_only(node: ast.AST) -> bool:
        return any(start <= node.lineno <= end for start, end in type_blocks)

    found = []
    rel = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name, nested(node), type_only(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                # `from mmspec import app` / `from . import serving` import a (sub)package or module.
                candidate = f"{module}.{alias.name}"
                target = candidate if candidate in modules or layer_of(candidate) != layer_of(module) else module
                found.append(Import(rel, node.lineno, target, nested(node), type_only(node)))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    """Human-readable layering violations of one file (empty when it follows the rules)."""
    own = layer_of(module_name(path))
    rel = path.relative_to(ROOT)
    problems = []
    for imp in imports_of(path, source):
        top = imp.module.split(".")[0]
        target = layer_of(imp.module)
        where = f"{rel}:{imp.line}: {own} module imports {imp.module}"
        if target is not None:
            if target in FORBIDDEN_LAYERS[own]:
                lazy_pipeline = rel.as_posix() == "mmspec/__init__.py" and target == PIPELINES and imp.in_function
                if not lazy_pipeline:
                    problems.append(f"{where} ({target} layer; {own} must not depend on it)")
        elif own == ENGINE and top not in sys.stdlib_module_names and top not in ENGINE_THIRD_PARTY:
            problems.append(
                f"{where} (the engine imports only the standard library, "
                f"{', '.join(sorted(ENGINE_THIRD_PARTY))} and engine modules)"
            )
        elif top in FORBIDDEN_THIRD_PARTY.get(own, set()):
            problems.append(f"{where} (not allowed in the {own} layer)")
    return problems


def import_cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly
    connected components of the import graph; imports under ``if TYPE_CHECKING:`` left out)."""
    files = {module_name(p): p for p in source_files()}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = set()
        for imp in imports_of(path):
            target = imp.module
            while target and target not in files:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and not imp.type_only:
                graph[name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_layer_has_files():
    """The classification sees the tree (a moved folder must not silently empty a layer)."""
    layers = {layer_of(module_name(path)) for path in source_files()}
    assert layers == {ENGINE, PIPELINES, TRAINING, APP}


@pytest.mark.parametrize("path", source_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_point_down(path):
    problems = violations(path)
    assert not problems, "layering violations (docs/DESIGN.md §3b):\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "modules importing each other (move what they share to a third module):\n" + "\n".join(
        " <-> ".join(group) for group in cycles
    )


@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        (
            "mmspec/loops/causal.py",
            "def f():\n    import transformers\n",
            "mmspec/loops/causal.py:2: engine module imports transformers",
        ),
        ("mmspec/stats.py", "from .pipelines.llamagen import LlamaGenPipeline\n", "imports mmspec.pipelines.llamagen"),
        ("mmspec/stats.py", "from . import app\n", "engine module imports mmspec.app"),
        ("kernels/rejection.py", "from mmspec.training import loop\n", "imports mmspec.training"),
        (
            "pipelines/vlm/targets.py",
            "def f():\n    from mmspec.app.jobs import job_state\n",
            "pipelines module imports mmspec.app.jobs",
        ),
        ("pipelines/llamagen/mulo.py", "import gradio as gr\n", "imports gradio"),
        ("pipelines/llamagen/mulo.py", "from ...data.emoji import EmojiDataset\n", "imports mmspec.data.emoji"),
        ("mmspec/training/eagle.py", "from ..app.defaults import CLASSES_FILE\n", "imports mmspec.app.defaults"),
        ("mmspec/__init__.py", "from .pipelines import LlamaGenPipeline\n", "imports mmspec.pipelines"),
    ],
)
def test_checker_reports_violations(file, source, expected):
    """The checker itself: it finds each kind of violation, in functions too, and names file and line."""
    problems = violations(ROOT / file, source)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("file", "source"),
    [
        (
            "mmspec/__init__.py",
            "def __getattr__(name):\n    from . import pipelines\n    return getattr(pipelines, name)\n",
        ),
        (
            "mmspec/loops/causal.py",
            "import math\nimport torch\nfrom ..types import Draft\nfrom mmspec.kernels import chain_rejection_sample\n",
        ),
        ("pipelines/vlm/targets.py", "import transformers\nfrom mmspec.types import TargetOutput\n"),
        (
            "mmspec/training/vlm.py",
            "from mmspec.pipelines.vlm import VLMPipeline\nfrom ..data.images import image_list\n",
        ),
        ("mmspec/app/cli.py", "from ..training.eagle import add_train_drafter_args\nimport gradio\n"),
    ],
)
def test_checker_allows_downward_imports(file, source):
    assert violations(ROOT / file, source) == []
