"""The house rules the code map relies on, read from the source (no model, no imports of it): no import
circle in service/ and pruning/ (function-level imports included), the rooms' arrows point down, no
service/ module over 400 lines, and routes never hold the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("pruning/**/*.py")])
ROUTES = ["ocr", "chat", "mistral_ocr", "jobs", "health"]  # the modules of service/api that declare routes


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(path): path for path in SOURCES}


def imported(name: str) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (inside functions too), as module names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported(name) for name in MODULES}


def circles() -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert circles() == []


def test_the_circle_finder_finds_one():
    GRAPH["service.errors"].add("service.inputs")  # the circle this rule was written against
    try:
        assert ["service.errors", "service.inputs"] in circles()
    finally:
        GRAPH["service.errors"].discard("service.inputs")


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("pruning", "service"),  # the pruner knows tensors, not the service
        ("service.errors", "service"),  # every room's errors: imports no room
        ("service.engine", "service.scheduler"),
        ("service.engine", "service.api"),
        ("service.scheduler", "service.api"),
        ("service.jobs", "service.api"),
    ],
)
def test_arrows_point_down(low, high):
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name == low or name.startswith(low + ".")
        for target in targets
        if (target == high or target.startswith(high + ".")) and not target.startswith(low)
    )
    assert upward == []


def test_no_service_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("route", ROUTES)
def test_routes_do_not_hold_the_engine(route):
    """A route goes through the door step (api/doors.open_door) and the scheduler; it never takes the
    engine itself (``scheduler.engine``, or the engine ``ensure_ready`` returns)."""
    tree = ast.parse(MODULES[f"service.api.{route}"].read_text())
    held = [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr == "engine")
        or (isinstance(node, ast.Name) and node.id == "engine")
        or (isinstance(node, ast.alias) and node.name == "OCREngine")
    ]
    assigned = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "ensure_ready"
    ]
    assert held == [] and assigned == []


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and the fakes beside it), never in another test module."""
    importing = sorted(
        f"{path.name} -> {node.module}"
        for path in (ROOT / "tests").rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_")
    )
    assert importing == []


def test_each_scheduler_knob_defaults_to_its_setting():
    """SchedulerConfig is built from the settings (``scheduler_config``); its own defaults serve benches and
    tests that build one directly, and must say what the settings say (one had drifted)."""
    from dataclasses import fields

    from service.scheduler.config import SchedulerConfig
    from service.settings import ServiceSettings

    settings = ServiceSettings.model_fields
    drifted = {
        knob.name: (knob.default, settings[knob.name].default)
        for knob in fields(SchedulerConfig)
        if knob.default != settings[knob.name].default
    }
    assert drifted == {}
