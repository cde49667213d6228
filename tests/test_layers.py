"""The import structure stays layered: every module imports only its own layer or those below, and no
modules import each other in a circle. docs/architecture.md draws the same picture.

Every `import` statement counts, also those inside functions (a lazy import is still a dependency);
generated stubs and tests are not checked. `importlib.import_module` by name is the one sanctioned way
for the CLI to reach a client package (the trainer) without depending on it.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "adapter_registry", "trainer", "benchmarks")

# Components, lowest first, and the components each may import besides itself.
# A module belongs to the longest prefix that names it.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "server.core": ("server.core",),
    "server.api.gen": ("server.api.gen",),
    "server.attention": ("server.core",),
    "server.model": ("server.core", "server.attention"),
    "server.lora": ("server.core", "server.model"),
    "adapter_registry": ("server.core", "server.model.config", "server.lora.weights"),
    "server.engine": ("server.core", "server.attention", "server.model", "server.lora"),
    "server.api": ("server.core", "server.api.gen", "server.model", "server.lora", "server.engine",
                   "adapter_registry", "server.metrics"),
    "server.metrics": ("server.core",),
    "server.client": ("server.core", "server.api.gen"),
    "server.cli": ("server.core", "server.api", "server.api.gen", "server.client", "server.metrics"),
    # Runs a fleet on loopback (PostgreSQL, replicas, HAProxy) as processes; talks to it as a client.
    "server.fleet": ("server.core", "server.api.gen", "server.client", "server.model"),
    # Clients of the server: they may use anything below; nothing below may use them.
    "trainer": ("server", "adapter_registry"),
    "benchmarks": ("server", "adapter_registry"),
}
# "server" as a whole (the package __init__) sits at the foundation too.
COMPONENTS["server"] = ()


def _component(module: str) -> str:
    best = ""
    for c in COMPONENTS:
        if (module == c or module.startswith(c + ".")) and len(c) > len(best):
            best = c
    assert best, f"{module}: belongs to no component; add it to COMPONENTS"
    return best


def _allowed(importer: str, imported: str) -> bool:
    own = _component(importer)
    if imported == own or imported.startswith(own + ".") and _component(imported) == own:
        return True
    return any(imported == a or imported.startswith(a + ".") for a in COMPONENTS[own])


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            if "gen" in rel.parts[:3] and rel.parts[:2] == ("server", "api") and rel.parts[2:3] == ("gen",):
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `module` imports, resolved to the longest known module name."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    out = set()
    for n in names:
        if n.split(".")[0] not in PACKAGES:
            continue
        while n and n not in known and not n.startswith("server.api.gen"):
            n = n.rpartition(".")[0]
        if n and n != module:
            out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_import_points_down_or_sideways_within_its_layer():
    bad = sorted(f"{m} -> {i}" for m, deps in _graph().items() for i in deps if not _allowed(m, i))
    assert not bad, "imports that run against the layers (see docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in deps if not d.startswith("server.api.gen")} for m, deps in _graph().items()}
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    graph = {m: {d for d in deps if not (m in graph and d.startswith(m + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import():
    assert not _allowed("adapter_registry.registry", "server.engine.types")
    assert not _allowed("server.lora.pool", "server.engine.scheduler")
    assert not _allowed("server.engine.engine", "trainer.cli")
    assert _allowed("server.engine.engine", "server.lora.pool")
    assert _allowed("adapter_registry.validate", "server.lora.weights")
