"""The package graph runs one way: ``inference`` builds on ``crjax``; ``crjax`` never imports
``inference``. Checked on the source (every import statement, also the lazy ones inside functions),
not by importing, so that no import order can hide a violation.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, nodes) -> list[tuple[int, str]]:
    """(line, absolute module name) of the import statements among ``nodes``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from crjax import runs` may import the submodule crjax.runs
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """Every import statement in the file, at any depth (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return _resolve(module, path, ast.walk(tree))


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself can fail: a lazy import inside a function and a relative one count."""
    pkg = tmp_path / "crjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "bad.py"
    mod.write_text("def f():\n    from inference.fit import fit_p_map\n    import inference\n"
                   "from .. import inference as x\n")
    names = [n for _, n in _imports("crjax.bad", mod)]
    assert "inference.fit" in names and "inference" in names
    assert "inference" in [_top(n) for n in names[-2:]]  # `from .. import inference`


def test_crjax_never_imports_inference():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for module, path in _modules("crjax").items()
           for line, name in _imports(module, path) if _top(name) == "inference"]
    assert not bad, "crjax must not import inference:\n" + "\n".join(bad)


def test_no_module_level_import_cycles():
    """Module-level imports (the ones that run at import time) form no cycle within crjax or
    within inference. Lazy imports inside functions are allowed to point back up."""
    mods = {**_modules("crjax"), **_modules("inference")}
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {m for _, m in _resolve(module, path, tree.body) if m in mods and m != module}
        # a package's __init__ runs before any of its submodules; it is not an edge of the graph
        graph[module] = {m for m in targets if not module.startswith(m + ".")}

    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [], set(), done)
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", ["crjax", "inference"])
def test_every_module_is_scanned(package):
    mods = _modules(package)
    assert f"{package}" in mods and len(mods) >= 4
