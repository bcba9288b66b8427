"""Print the import graph of the ``mavis_lc`` package and fail on import circles.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency); imports under ``if TYPE_CHECKING:`` do not, since they never run. Nodes are
modules; a package's ``__init__`` is its own node. Usage::

    python scripts/import_graph.py            # modules, grouped by folder, and any circles
    python scripts/import_graph.py --folders  # the folder-level graph only

Exit status 1 when there is a circle between modules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "mavis_lc"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(path: Path, name: str, modules: set[str], is_package: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        # the longest module prefix of an imported dotted name
        while target:
            if target in modules:
                return target
            target = target.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    hit = resolve(alias.name)
                    if hit:
                        found.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith(PACKAGE):
                continue
            for alias in node.names:
                hit = resolve(f"{source}.{alias.name}") or resolve(source)
                if hit:
                    found.add(hit)
    found.discard(name)
    return found


def build_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(root, p): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    modules = set(files)
    return {m: imports_of(p, m, modules, p.name == "__init__.py") for m, p in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's
    ``__init__`` counts as a module, so a circle through a re-export is found too."""
    edges = graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
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
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def folder_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = defaultdict(set)
    for m, ts in graph.items():
        folders[folder_of(m)]
        for t in ts:
            if folder_of(t) != folder_of(m):
                folders[folder_of(m)].add(folder_of(t))
    return dict(folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--folders", action="store_true", help="print the folder-level graph only")
    args = parser.parse_args(argv)
    graph = build_graph(args.root)
    short = lambda m: m.removeprefix(PACKAGE + ".") if m != PACKAGE else PACKAGE  # noqa: E731
    if args.folders:
        for folder, targets in sorted(folder_graph(graph).items()):
            print(f"{short(folder):<22} -> {', '.join(sorted(short(t) for t in targets)) or '-'}")
    else:
        for m in sorted(graph):
            print(f"{short(m):<34} -> {', '.join(sorted(short(t) for t in graph[m])) or '-'}")
    found = circles(graph)
    if found:
        print(f"\n{len(found)} import circle(s):")
        for c in found:
            print("  " + " <-> ".join(short(m) for m in c))
        return 1
    print(f"\n{len(graph)} modules, no import circles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
