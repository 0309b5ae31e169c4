"""Architecture rules checked on the source: inference code imports nothing from calibration, and
no import cycle runs through tfmq's modules (imports inside functions included)."""

import ast
from pathlib import Path

import tfmq

SRC = Path(tfmq.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """tfmq module -> the tfmq modules it imports (anywhere in the file), package __init__ excluded
    as a target unless imported by name."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("tfmq"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tfmq"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def closure(graph, start):
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in graph.get(m, ()):
            if d not in seen and d != "tfmq":
                seen.add(d)
                todo.append(d)
    return seen


def test_inference_imports_nothing_from_calibration():
    graph = import_graph()
    inference = [m for m in graph if m.startswith("tfmq.runtime")] + ["tfmq.checkpoint", "tfmq.sampling"]
    for m in inference:
        bad = sorted(d for d in closure(graph, m) if d.startswith("tfmq.calib"))
        assert not bad, f"{m} reaches calibration modules {bad}"


def test_no_import_cycle_anywhere():
    graph = import_graph()
    assert len(graph) > 40 and "tfmq.calib.fsc" in closure(graph, "tfmq.recipes")   # the graph is real
    on_cycle = sorted(m for m in graph if m in closure(graph, m))
    assert not on_cycle, f"modules on an import cycle: {on_cycle}"


def test_only_the_adapters_name_the_unet_component():
    """The denoiser is reached through its family's adapter (tfmq.models): no module outside
    models/ reads ``pipe.unet`` or names the ``"unet"`` component."""
    import re
    pattern = re.compile(r"\.unet\b|[\"']unet[\"']")
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("models/"):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
