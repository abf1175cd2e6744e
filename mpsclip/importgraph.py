"""The package's import graph, read from the source with ``ast`` (nothing is imported), and its cycles.

    python -m mpsclip.importgraph                 # module -> imports, grouped by folder; folder -> folders
    python -m mpsclip.importgraph --check         # only the cycle check (exit status 1 on a cycle)
    python -m mpsclip.importgraph --dot graph.dot # also a Graphviz file (dot -Tsvg graph.dot > graph.svg)

Modules are those of ``mpsclip/`` plus the top-level ``kernels/ export/ serve/ bench/`` folders, named as installed
(``mpsclip.kernels`` ...). An import inside a function (a lazy import, made to keep start-up fast) is an edge too,
listed apart; imports under ``if TYPE_CHECKING:`` are not edges (they never run). Any cycle among mpsclip modules,
through top-level or lazy imports, makes the exit status 1.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mpsclip.io import atomic_write

PACKAGE = "mpsclip"
ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("kernels", "export", "serve", "bench")  # installed as mpsclip.<name> (pyproject package-dir)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # run when the module is imported
    lazy: set[str] = field(default_factory=set)  # run when a function runs

    @property
    def folder(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def source_folders(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> folder: ``mpsclip`` and the top-level folders that install as ``mpsclip.<name>``."""
    folders = {PACKAGE: root / PACKAGE}
    folders.update({f"{PACKAGE}.{name}": root / name for name in TOP_LEVEL if (root / name / "__init__.py").is_file()})
    return folders


def find_modules(root: Path = ROOT) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    folders = source_folders(root)
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(not part.isidentifier() for part in parts) or not _in_package(path, folder):
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            if name in folders and folder != folders[name]:
                continue  # a stray mpsclip/kernels would shadow nothing: the installed mapping wins
            modules[name] = Module(name, path, is_package)
    return modules


def _in_package(path: Path, folder: Path) -> bool:
    """Every folder between ``folder`` and ``path`` is a package (has ``__init__.py``)."""
    return all((parent / "__init__.py").is_file() for parent in path.parents if parent.is_relative_to(folder))


def read_imports(modules: dict[str, Module]) -> None:
    """Fill each module's ``imports`` and ``lazy`` with the mpsclip modules it imports."""
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node, in_function in _import_nodes(tree):
            for target in _targets(node, module, modules):
                if target != module.name:
                    (module.lazy if in_function else module.imports).add(target)
        module.lazy -= module.imports


def _import_nodes(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from (pair for child in node.orelse for pair in _import_nodes(ast.Module([child], []), in_function))
        else:
            nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _import_nodes(node, nested)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: Module, modules: dict[str, Module]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if (target := _known(alias.name, modules)) is not None:
                yield target
        return
    base = node.module or ""
    if node.level:
        anchor = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    for alias in node.names:  # `from pkg import sub` imports the module pkg.sub when there is one
        target = _known(f"{base}.{alias.name}", modules) if f"{base}.{alias.name}" in modules else None
        if (target := target or _known(base, modules)) is not None:
            yield target


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``mpsclip.archive.store.open_store`` -> store)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in modules:
            return prefix
    return None


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~150)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(cycles, key=lambda c: (-len(c), c))


def listing(modules: dict[str, Module]) -> str:
    """Module -> imports grouped by folder, then folder -> folders (top-level and lazy imports together)."""
    lines: list[str] = []
    for folder in sorted({m.folder for m in modules.values()}):
        lines.append(f"[{folder}]")
        for module in sorted((m for m in modules.values() if m.folder == folder), key=lambda m: m.name):
            lazy = f"   (lazy: {', '.join(sorted(module.lazy))})" if module.lazy else ""
            lines.append(f"  {module.name} -> {', '.join(sorted(module.imports)) or '-'}{lazy}")
    lines.append("[folders]")
    for folder, targets in sorted(folder_edges(modules).items()):
        lines.append(f"  {folder} -> {', '.join(sorted(targets)) or '-'}")
    return "\n".join(lines) + "\n"


def folder_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m.folder: set() for m in modules.values()}
    for module in modules.values():
        edges[module.folder] |= {modules[t].folder for t in module.imports | module.lazy} - {module.folder}
    return edges


def dot(modules: dict[str, Module]) -> str:
    lines = ["digraph mpsclip {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for position, folder in enumerate(sorted({m.folder for m in modules.values()})):
        lines.append(f'  subgraph cluster_{position} {{ label="{folder}";')
        lines += [f'    "{m.name}";' for m in sorted(modules.values(), key=lambda m: m.name) if m.folder == folder]
        lines.append("  }")
    for module in sorted(modules.values(), key=lambda m: m.name):
        lines += [f'  "{module.name}" -> "{t}";' for t in sorted(module.imports)]
        lines += [f'  "{module.name}" -> "{t}" [style=dashed];' for t in sorted(module.lazy)]
    return "\n".join([*lines, "}"]) + "\n"


def check(modules: dict[str, Module]) -> tuple[list[list[str]], list[list[str]]]:
    """Cycles through top-level imports only, and the further cycles that lazy imports close."""
    eager = find_cycles({name: m.imports for name, m in modules.items()})
    every = find_cycles({name: m.imports | m.lazy for name, m in modules.items()})
    return eager, [cycle for cycle in every if cycle not in eager]


def build(root: Path = ROOT) -> dict[str, Module]:
    modules = find_modules(root)
    read_imports(modules)
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpsclip.importgraph",
        description="Print the import graph of mpsclip (read with ast, nothing imported) and check it for cycles.",
        epilog="examples:\n  python -m mpsclip.importgraph --check\n  python -m mpsclip.importgraph --dot graph.dot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="print only the cycle check")
    parser.add_argument("--dot", type=Path, metavar="FILE", help="also write the graph as Graphviz dot")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    modules = build(args.root)
    if not args.check:
        sys.stdout.write(listing(modules))
    if args.dot:
        atomic_write(args.dot, dot(modules))
    eager, lazy = check(modules)
    edges = sum(len(m.imports) for m in modules.values())
    lazy_edges = sum(len(m.lazy) for m in modules.values())
    for label, cycles in (("top-level imports", eager), ("with lazy imports", lazy)):
        for cycle in cycles:
            print(f"cycle ({label}): {' <-> '.join(cycle)}")
    verdict = "no import cycles" if not eager and not lazy else f"{len(eager) + len(lazy)} import cycles"
    print(f"{len(modules)} modules, {edges} top-level + {lazy_edges} lazy import edges: {verdict}")
    return 1 if eager or lazy else 0


if __name__ == "__main__":
    raise SystemExit(main())
