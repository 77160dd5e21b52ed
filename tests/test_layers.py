"""The house rules, read from the code (every import, function-level ones included), not kept by convention.

1. No import circles.
2. Layers import one way: core imports nothing of the package but errors; io no engine, store, fleet, loop or
   cli; store and engine no fleet, loop or cli and no Ray; the fleet config imports no Ray (nor any module that
   does at import time); nothing imports cli; and every subpackage is imported through its __init__.
3. Rooms of a readable size: no module over 500 lines, no function over 60 (tests, jobs and bench too).
4. Typed states: no status string compared outside its enum's module; exit statuses defined once.
5. Storage differences live in the storage classes: no caller asks whether a Dir is a LocalDir or an S3Dir.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "safemerge_ray"

# The layers, lowest first: a module may import its own subpackage and anything on a lower layer.
LAYERS = {
    "safemerge_ray": 0, "errors": 0,
    "core": 1,
    "io": 2, "progress": 2,
    "options": 3, "cluster": 3, "store": 3,
    "engine": 4, "service": 4,
    "loop": 5,
    "fleet": 6,
    "views": 7, "synthetic": 7,
    "cli": 8,
    "__main__": 9,
}


@dataclass
class Module:
    name: str  # safemerge_ray.fleet.run
    path: Path
    tree: ast.Module
    imports: dict[str, list[int]] = field(default_factory=dict)  # imported package module -> lines
    top_level_imports: set[str] = field(default_factory=set)  # those run when the module is imported
    third_party: dict[str, bool] = field(default_factory=dict)  # e.g. "ray" -> imported at the top level

    @property
    def room(self) -> str:
        """Its subpackage or top-level module: `fleet`, `errors`, or `safemerge_ray` for the package itself."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/") / "__init__.py").exists()


def _exists(name: str) -> bool:
    return _is_package(name) or (ROOT / (name.replace(".", "/") + ".py")).exists()


def _resolve(module: Module, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement imports (a submodule named in `from . import x` included)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "safemerge_ray"]
    if node.level:
        base = module.name.split(".")
        if not _is_package(module.name):
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "safemerge_ray":
        return []
    found = [target]
    found += [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
    return found


def _top_level_nodes(body: list[ast.stmt]):
    """Nodes run at import time: not inside functions, nor in `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.ClassDef):
            yield node
            yield from _top_level_nodes(node.body)
            continue
        yield from ast.walk(node)


def _load() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = Module(_module_name(path), path, tree)
        top = {id(n) for n in _top_level_nodes(tree.body)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve(module, node):
                if module.name == target or module.name.startswith(target + "."):
                    continue  # its own package: already being imported (`from . import x`, `from .. import y`)
                module.imports.setdefault(target, []).append(node.lineno)
                if id(node) in top:
                    module.top_level_imports.add(target)
            outside = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if node.module and not node.level else [])
            for name in outside:
                root = name.split(".")[0]
                module.third_party[root] = module.third_party.get(root, False) or id(node) in top
        modules[module.name] = module
    # `if TYPE_CHECKING:` imports are for the type checker only: they never run.
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        for target in _resolve(module, inner):
                            module.imports.pop(target, None)
    return modules


MODULES = _load()


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_rules_read_the_whole_package():
    assert len(MODULES) > 40 and "safemerge_ray.fleet.run" in MODULES and "safemerge_ray.core.subspace" in MODULES
    assert MODULES["safemerge_ray.fleet.run"].imports, "imports were not read"


def test_no_import_circles():
    graph = {name: set(m.imports) - {name} for name, m in MODULES.items()}
    graph = {name: {t for t in targets if t in MODULES} for name, targets in graph.items()}
    assert _circles(graph) == []


def test_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _violations(rule) -> list[str]:
    return [f"{m.path.relative_to(ROOT)}:{lines[0]}: imports {target}"
            for m in MODULES.values() for target, lines in m.imports.items()
            if target in MODULES and rule(m, MODULES[target])]


def test_layers_import_one_way():
    assert _violations(lambda m, t: m.room != t.room and LAYERS[t.room] >= LAYERS[m.room]) == []


def test_core_imports_only_errors():
    assert _violations(lambda m, t: m.room == "core" and t.room not in ("core", "errors")) == []


def test_io_imports_nothing_above_it():
    above = {"engine", "store", "fleet", "loop", "cli", "views", "options", "cluster"}
    assert _violations(lambda m, t: m.room == "io" and t.room in above) == []


@pytest.mark.parametrize("room", ["store", "engine"])
def test_store_and_engine_import_no_fleet_loop_cli_or_ray(room):
    assert _violations(lambda m, t: m.room == room and t.room in ("fleet", "loop", "cli", "cluster")) == []
    assert [m.name for m in MODULES.values() if m.room == room and "ray" in m.third_party] == []


def test_nothing_imports_cli():
    assert _violations(lambda m, t: t.room == "cli" and m.room not in ("cli", "__main__")) == []


def test_subpackages_are_imported_through_their_init():
    def reaches_inside(m: Module, t: Module) -> bool:
        inside = t.name.count(".") >= 2  # safemerge_ray.<subpackage>.<module>
        return m.room != t.room and inside
    assert _violations(reaches_inside) == []


def test_fleet_config_imports_no_ray():
    """Statically: nothing the config imports at import time (transitively) imports Ray at its top level."""
    seen, todo = set(), ["safemerge_ray.fleet.config"]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo += MODULES[name].top_level_imports
        parent = name.rsplit(".", 1)[0]
        if parent in MODULES:
            todo.append(parent)  # importing a.b runs a/__init__ first
    assert [n for n in sorted(seen) if MODULES[n].third_party.get("ray")] == []
    assert "safemerge_ray.fleet.run" in seen  # the fleet's __init__ was followed too


def test_fleet_config_imports_no_ray_when_run():
    code = ("import sys, safemerge_ray.fleet.config as c; c.parse_config; "
            "sys.exit(3 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] or "importing the fleet config imported ray"


# The rooms' size rule holds for every Python file of the repo: the package, and the jobs, benchmarks and tests
# around it.
PYTHON_FILES = sorted(m.path for m in MODULES.values()) + sorted(
    path for top in ("jobs", "bench", "tests", "infra") for path in (ROOT / top).rglob("*.py"))


def test_modules_stay_under_500_lines():
    assert [f"{path.relative_to(ROOT)}: {n}" for path in PYTHON_FILES
            if (n := len(path.read_text().splitlines())) > 500] == []


def test_functions_stay_under_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in PYTHON_FILES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


STATE_ENUMS = {  # enum -> its module: the one place its values may be written as strings
    "AdapterStatus": "safemerge_ray.fleet.plan", "PublishedState": "safemerge_ray.store.history",
    "NextRun": "safemerge_ray.store.history", "RecordKind": "safemerge_ray.store.records",
    "Judgement": "safemerge_ray.loop.judges", "LayerAction": "safemerge_ray.core.policy",
    "PromptSet": "safemerge_ray.loop.spec",
}


def _enum_values() -> dict[str, str]:
    """Every state's string value -> the module that defines its enum."""
    values = {}
    for enum, name in STATE_ENUMS.items():
        tree = MODULES[name].tree
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == enum)
        for stmt in cls.body:
            value = stmt.value if isinstance(stmt, ast.Assign) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                values[value.value] = name
    return values


def _compared_strings(node: ast.Compare) -> list[str]:
    found = []
    for side in [node.left, *node.comparators]:
        items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
        found += [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    return found


def test_no_state_string_is_compared_outside_its_enum():
    values = _enum_values()
    assert {"failed", "held", "committed", "published", "harmful", "merged"} <= set(values)
    offending = [f"{m.path.relative_to(ROOT)}:{node.lineno}: {s!r}"
                 for m in MODULES.values() for node in ast.walk(m.tree) if isinstance(node, ast.Compare)
                 for s in _compared_strings(node) if s in values and values[s] != m.name]
    assert offending == []


def test_exit_statuses_are_defined_once():
    """ExitStatus (errors.py) is the one source: no EXIT_* constants, no literal 130 returned or recorded."""
    defined = [f"{m.path.relative_to(ROOT)}:{node.lineno}" for m in MODULES.values() for node in ast.walk(m.tree)
               if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
               if isinstance(target, ast.Name) and target.id.startswith("EXIT_")]
    literal = [f"{m.path.relative_to(ROOT)}:{node.lineno}" for m in MODULES.values() for node in ast.walk(m.tree)
               if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)
               and node.value.value in (1, 2, 3, 4, 5, 130) and m.room == "cli"]
    assert defined == [] and literal == []


STORE_CLASSES = {"LocalDir", "S3Dir"}
STORE_MODULES = {"safemerge_ray.io.local", "safemerge_ray.io.s3", "safemerge_ray.io.storage"}  # where they are made


def _classes_checked(node: ast.Call) -> set[str]:
    """The class names an isinstance() call tests against (a name, or a tuple of them)."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2):
        return set()
    kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
    return {k.id if isinstance(k, ast.Name) else k.attr for k in kinds if isinstance(k, (ast.Name, ast.Attribute))}


def test_no_caller_asks_which_store_a_dir_is():
    """What only a local disk has is asked of the Dir (`local_path`, `arrow_location`), not by its class."""
    offending = [f"{m.path.relative_to(ROOT)}:{node.lineno}" for m in MODULES.values() if m.name not in STORE_MODULES
                 for node in ast.walk(m.tree) if isinstance(node, ast.Call) and _classes_checked(node) & STORE_CLASSES]
    assert offending == []
    probe = ast.parse("isinstance(out, LocalDir) or isinstance(d, (io.S3Dir, str))")
    assert [_classes_checked(n) & STORE_CLASSES for n in ast.walk(probe) if isinstance(n, ast.Call)] == \
        [{"LocalDir"}, {"S3Dir"}]  # the finder finds both spellings
