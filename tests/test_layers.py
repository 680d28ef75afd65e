"""The harness's floors (harness.FLOORS) hold: no import cycle, and no module imports a higher floor.

Imports are read with ``ast`` from the source, including those inside functions and under ``TYPE_CHECKING``: an
import placed in a function to dodge a cycle is still an edge of the architecture.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import harness

PACKAGE = Path(harness.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The harness modules ``name`` imports (``from harness.x import y`` counts harness.x.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def floor(name: str) -> int:
    """A module's floor: its subpackage's index in harness.FLOORS, +1 (the top-level modules below every floor are
    harness.GROUND; the rest of the top level, the CLI, is the roof)."""
    parts = name.split(".")
    if len(parts) == 1:
        return -1  # the package itself: its __init__ imports nothing
    if parts[1] in harness.FLOORS:
        return harness.FLOORS.index(parts[1]) + 1
    return 0 if parts[1] in harness.GROUND else len(harness.FLOORS) + 1


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} (floor {floor(src)}) imports {dst} (floor {floor(dst)})"
                  for src, dsts in edges.items() for dst in dsts if floor(dst) > floor(src))  # fmt: skip


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a cycle or a knot of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_lives_on_a_known_floor() -> None:
    top_level = [name for name, path in modules().items() if path.parent == PACKAGE and path.name != "__init__.py"]
    loose = [name for name in top_level if name.split(".")[1] not in (*harness.GROUND, *harness.ROOF)]
    assert not loose, f"top-level modules that are neither ground (harness.GROUND) nor roof (harness.ROOF): {loose}"
    floors = {path.parent.name for path in modules().values() if path.parent != PACKAGE}
    assert floors <= set(harness.FLOORS), f"subpackages that are not floors: {floors - set(harness.FLOORS)}"


def test_no_module_imports_a_higher_floor() -> None:
    assert upward_edges(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_guard() -> None:
    """The walker sees function-level and TYPE_CHECKING imports, and both checks fire on a made-up violation."""
    edges = graph()
    assert "harness.report.kcidb" in edges["harness.cli"]  # imported inside a function
    assert "harness.host.loads" in edges["harness.judge.pebs"]  # imported under TYPE_CHECKING only
    assert upward_edges({"harness.cpu.caps": {"harness.judge.verdict"}})
    assert not upward_edges({"harness.judge.verdict": {"harness.cpu.caps", "harness.errors"}})
    assert cycles({"harness.judge.a": {"harness.judge.b"}, "harness.judge.b": {"harness.judge.a"}})
    assert resolves("harness.judge.arch_counters.gp_event") and resolves("harness.cli.main")
    assert not resolves("harness.judge.verdicts.gp_event") and not resolves("harness.judge.arch_counters.nothing")


def test_every_floor_says_what_it_owns_and_may_import() -> None:
    """A floor's __init__ docstring is its plan: what it owns, and the floors below it that it may import."""
    for name in harness.FLOORS:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert len(doc) > 200 and "May import" in doc, f"harness/{name}/__init__.py: {doc[:60]!r}"


#: Where harness is imported from: the package, the suite, the self-tests, the scripts.
IMPORTERS = ("harness", "guest_tests", "tests", "scripts")
DOTTED = re.compile(r"harness(\.[A-Za-z_]\w*)+")
#: Names gone on purpose that a self-test still writes: an editable install made before the move names them.
RETIRED = ("harness.pytest_plugin",)


def resolves(dotted: str) -> bool:
    """Whether ``harness.a.b[.name]`` names a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # a prefix that is a module, not a package: look further up
            continue
        target = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(target, attr):
                return False
            target = getattr(target, attr)
        return True
    return False


def test_every_harness_import_and_dotted_name_resolves() -> None:
    """Imports inside functions and names in strings (monkeypatch targets, markers) run only on some hosts (KVM, a
    mediated vPMU, rejudge): each must still name a real module and attribute after a move."""
    broken = []
    for top in IMPORTERS:
        for path in sorted((PACKAGE.parent / top).rglob("*.py")):
            if path == Path(__file__):
                continue  # its made-up module names test the checks above
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("harness"):
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names if alias.name.startswith("harness")]
                elif (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and DOTTED.fullmatch(node.value)
                    and node.value not in RETIRED
                ):
                    names = [node.value]
                else:
                    continue
                broken += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}" for name in names
                           if not resolves(name)]  # fmt: skip
    assert broken == []


#: guest_tests/test_<feature>.py whose verdict module is named otherwise.
VERDICT_MODULE_OF = {"coexistence": "coexist"}


def test_every_feature_of_the_suite_has_its_verdict_module() -> None:
    """One verdict module per feature, as the suite has one test module per feature: a reader of
    guest_tests/test_lbr.py finds its rules in harness/judge/lbr.py."""
    features = [path.stem.removeprefix("test_") for path in (PACKAGE.parent / "guest_tests").glob("test_*.py")]
    missing = [f for f in features if not (PACKAGE / "judge" / f"{VERDICT_MODULE_OF.get(f, f)}.py").is_file()]
    assert features and missing == []
