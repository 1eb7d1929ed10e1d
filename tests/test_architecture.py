"""The package's shape: imports follow the data flow, no import cycle, one installed top-level package.

Every ``import`` of a wsi_mil module inside wsi_mil/ and workflows/ (at the top of a file or inside a
function) is read from the source. A module may import modules of its own layer or of lower layers
(down the data flow), never of a higher one; no set of modules imports each other in a cycle.
docs/ARCHITECTURE.md draws the same layers.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Foundation modules know no stage; a stage knows the stages before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"wsi_mil", "errors", "redaction", "registry", "config", "layout", "reports", "devices", "stores",
                    "compute", "tracking", "locks"}),
    ("slides", {"slides"}),
    ("tissue and ground truth", {"tissue", "annotations", "synth"}),
    ("tiling", {"tiling"}),
    ("encoders", {"encoders"}),
    ("extract", {"extract"}),
    ("mil", {"mil"}),
    ("heatmaps", {"heatmaps"}),
    ("workflows and the command line", {"workflows", "cli"}),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, as installed (workflows/ is wsi_mil.workflows)."""
    found: dict[str, Path] = {}
    for top, package in ((ROOT / "wsi_mil", "wsi_mil"), (ROOT / "workflows", "wsi_mil.workflows")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The known module ``name`` refers to (a package's module, or the package itself)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """wsi_mil modules imported anywhere in one file."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "wsi_mil" or name.startswith("wsi_mil."):
                target = _resolve(name)
                if target and target != module:
                    out.add(target)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _part(module: str) -> str:
    """The layer member a module belongs to: ``wsi_mil.mil.cv`` -> ``mil``, ``wsi_mil`` -> ``wsi_mil``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
    unplaced = sorted({_part(m) for m in MODULES} - set(RANK))
    assert unplaced == [], f"assign {unplaced} to a layer in tests/test_architecture.py and docs/ARCHITECTURE.md"


def test_imports_never_go_up_the_data_flow():
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            # a package's __init__ may hand on names of its own modules
            if target.startswith(module + ".") and MODULES[module].name == "__init__.py" and module != "wsi_mil":
                continue
            if RANK[_part(target)] > RANK[_part(module)]:
                upward.append(f"{module} -> {target} ({LAYERS[RANK[_part(module)]][0]} imports "
                              f"{LAYERS[RANK[_part(target)]][0]})")
    assert upward == []


def test_no_import_cycles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    # a package face importing its own modules, which import each other through the face, is no cycle here:
    # every module imports its siblings by their full dotted names
    assert [" -> ".join(c) for c in cycles] == []


def test_the_core_never_imports_workflows_and_only_tracking_imports_mlflow():
    core = [m for m in MODULES if _part(m) not in ("workflows", "cli")]
    assert [m for m in core for t in GRAPH[m] if _part(t) == "workflows"] == []
    mlflow_users = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                mlflow_users.append(module)
    assert sorted(set(mlflow_users)) == ["wsi_mil.tracking"]


def test_one_installed_top_level_package_holding_every_subpackage():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert {p.split(".")[0] for p in packages} == {"wsi_mil"}
    assert setuptools["package-dir"] == {"wsi_mil.workflows": "workflows"}
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert sorted(packages) == sorted(on_disk), "list every package directory in pyproject.toml [tool.setuptools]"
    assert not (ROOT / "workflows" / "__init__.py").read_text().count("import workflows")


def test_nothing_imports_the_workflows_folder_as_a_top_level_package():
    """`workflows` is installed as `wsi_mil.workflows`; `import workflows` only works from the repo root."""
    offenders = []
    for folder in ("wsi_mil", "workflows", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                if any(n == "workflows" or n.startswith("workflows.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_wsi_mil_name_the_benchmarks_import_exists():
    """A benchmark script is not run by the suite; a moved module must still not break its imports."""
    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("wsi_mil"):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    missing.append(f"{path.name}: {exc}")
                    continue
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []


STAGE_ENTRY_POINTS = [
    "wsi_mil.config:load_config", "wsi_mil.tiling:tile_cohort", "wsi_mil.encoders:build_encoder",
    "wsi_mil.extract:extract_cohort", "wsi_mil.mil.models:build_model", "wsi_mil.mil.methods:build_method",
    "wsi_mil.mil.cv:train_cohort", "wsi_mil.mil.evaluation:evaluate_run", "wsi_mil.mil.checkpoints:load_fold_method",
    "wsi_mil.heatmaps:render_slide_heatmap", "wsi_mil.workflows.heatmap:heatmaps_for_run",
    "wsi_mil.workflows.predict:predict_slides", "wsi_mil.workflows.cohort:run_cohort", "wsi_mil.synth:generate_cohort",
]
MODEL_FORWARDS = ["wsi_mil.mil.base:MILModel.forward", "wsi_mil.mil.base:MILModel.aggregate"]


@pytest.mark.parametrize("target", STAGE_ENTRY_POINTS + MODEL_FORWARDS)
def test_stage_entry_points_and_model_forwards_have_numpydoc_sections(target):
    import importlib
    import inspect

    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    doc = inspect.getdoc(obj) or ""
    sections = ["Parameters\n----------", "Returns\n-------"] + (["Raises\n------"] if target in STAGE_ENTRY_POINTS else [])
    assert [s.split()[0] for s in sections if s not in doc] == []
    params = doc.split("Parameters\n----------")[1].split("Returns\n-------")[0]
    named = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
    assert [p for p in named if p not in params] == []
