#!/usr/bin/env python3
"""Check the package's layout rules from the source alone (stdlib only: ast, no import of clproxy).

Rules (issue 12):

* no import cycle between clproxy modules, counting module-level imports only (an import inside a
  function runs later, when every module is loaded, so it cannot deadlock an import; an import under
  ``if TYPE_CHECKING:`` never runs);
* no module under ``clproxy/daemon/`` imports ``clproxy.cli`` anywhere, inside functions too: the
  twistd side must not depend on the command line;
* the pure modules (routing policy/pool/router, translate, sse, redact, config) never import
  ``twisted.internet.reactor``, at module level or inside functions: they take a clock instead;
* the shipped fakes (``clproxy/testing/``) import the global reactor only inside the function that
  needs it when none was passed, never at import time (importing a fake must not install a reactor).

Usage: ``scripts/check_layout.py [ROOT]`` where ROOT holds the ``clproxy/`` package (default: this
repository). Prints one line per violation (``path:line: message``) and exits 1 if there is any.
"""

import ast
import fnmatch
import os
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

PACKAGE = "clproxy"

#: Modules that must not import the global reactor, as glob patterns of paths relative to ROOT.
PURE = (
    "clproxy/routing/policy.py",
    "clproxy/routing/pool.py",
    "clproxy/routing/router.py",
    "clproxy/routing/limits.py",
    "clproxy/routing/affinity.py",
    "clproxy/routing/headroom.py",
    "clproxy/team/limits.py",
    "clproxy/translate/*.py",
    "clproxy/proxy/sse.py",
    "clproxy/observe/redact.py",
    "clproxy/config/*.py",
    "clproxy/team/pricing.py",
    "clproxy/team/usage.py",
    "clproxy/team/keys.py",
    "clproxy/team/keystore.py",
)

#: Modules that may use the global reactor, but must not import it at import time.
LAZY_REACTOR = (
    "clproxy/testing/*.py",
)

REACTOR = "twisted.internet.reactor"


class Import(NamedTuple):
    """One imported module name, where it was imported, and whether that import runs at import time."""

    target: str
    line: int
    module_level: bool


def module_name(relpath: str) -> str:
    """``clproxy/a/b.py`` -> ``clproxy.a.b``; ``clproxy/a/__init__.py`` -> ``clproxy.a``."""
    parts = relpath[:-len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: str) -> Dict[str, str]:
    """Every module of the package under ``root``: dotted name -> path relative to ``root``."""
    modules = {}
    for directory, dirnames, filenames in os.walk(os.path.join(root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                relpath = os.path.relpath(os.path.join(directory, filename), root).replace(os.sep, "/")
                modules[module_name(relpath)] = relpath
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module_level: bool) -> Iterator[Tuple[ast.AST, bool]]:
    """Every import statement under ``node``, with whether it runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from ((n, False) for n, _ in _walk(ast.Module(body=child.body, type_ignores=[]), False))
            for orelse in child.orelse:
                yield from _walk(ast.Module(body=[orelse], type_ignores=[]), module_level)
        else:
            yield from _walk(child, module_level)


def imports_of(name: str, relpath: str, tree: ast.AST, modules: Dict[str, str]) -> List[Import]:
    """The modules ``tree`` imports; ``from a import b`` names ``a.b`` when that is a module of ours."""
    is_package = relpath.endswith("/__init__.py")
    found = []
    for node, module_level in _walk(tree, True):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, node.lineno, module_level))
            continue
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            # Relative: strip one component per level (a package's own level-1 is itself).
            anchor = name.split(".")
            drop = node.level - 1 if is_package else node.level
            anchor = anchor[:len(anchor) - drop] if drop else anchor
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            found.append(Import(full if full in modules or full == REACTOR else base, node.lineno, module_level))
    return found


def _cycle_in(component: Set[str], graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle through the strongly connected ``component``, as ``[a, b, ..., a]``."""
    start = min(component)
    # Breadth-first from start back to start, inside the component: the shortest such cycle.
    previous: Dict[str, Optional[str]] = {start: None}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for nxt in sorted(graph[current] & component):
            if nxt == start:
                path = [current]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])  # type: ignore[arg-type]
                return list(reversed(path)) + [start]
            if nxt not in previous:
                previous[nxt] = current
                queue.append(nxt)
    return [start, start]


def strongly_connected(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's strongly connected components (iterative), those with a cycle only."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    result = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    result.append(component)
    return result


def check(root: str) -> List[str]:
    """Every violation of the layout rules under ``root``, one line each, sorted."""
    modules = find_modules(root)
    problems = []
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    first_line: Dict[Tuple[str, str], int] = {}
    for name, relpath in sorted(modules.items()):
        with open(os.path.join(root, relpath), encoding="utf-8") as f:
            source = f.read()
        try:
            tree = ast.parse(source, relpath)
        except SyntaxError as e:
            problems.append(f"{relpath}:{e.lineno}: cannot parse: {e.msg}")
            continue
        pure = any(fnmatch.fnmatch(relpath, pattern) for pattern in PURE)
        lazy = any(fnmatch.fnmatch(relpath, pattern) for pattern in LAZY_REACTOR)
        for imported in imports_of(name, relpath, tree, modules):
            target = imported.target
            if name.startswith(f"{PACKAGE}.daemon.") or name == f"{PACKAGE}.daemon":
                if target == f"{PACKAGE}.cli" or target.startswith(f"{PACKAGE}.cli."):
                    problems.append(f"{relpath}:{imported.line}: {name} imports {target} "
                                    f"(daemon/ must never import cli/)")
            if pure and (target == REACTOR or target.startswith(REACTOR + ".")):
                problems.append(f"{relpath}:{imported.line}: {name} imports the global reactor "
                                f"(a pure module: take a clock or reactor as a parameter)")
            elif lazy and imported.module_level and (target == REACTOR or target.startswith(REACTOR + ".")):
                problems.append(f"{relpath}:{imported.line}: {name} imports the global reactor at import time "
                                f"(import it inside the function that needs it, when none was passed)")
            if imported.module_level and target in modules and target != name:
                graph[name].add(target)
                first_line.setdefault((name, target), imported.line)
    for component in strongly_connected(graph):
        cycle = _cycle_in(component, graph)
        line = first_line.get((cycle[0], cycle[1]), 1)
        problems.append(f"{modules[cycle[0]]}:{line}: import cycle: {' -> '.join(cycle)}")
    return sorted(problems)


def main(argv: List[str]) -> int:
    """Run the check on ``argv[1]`` (default: the repository holding this script); 1 on a violation."""
    root = argv[1] if len(argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, PACKAGE)):
        print(f"check_layout: no {PACKAGE}/ package under {root}", file=sys.stderr)
        return 2
    problems = check(root)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
