"""Boundaries between the boxes (issue 18 item 4): libraries never import CLI modules, and every client
reaches a server through the one client module."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOXES = {"llmwatts": "llmwatts", "server": "llmwatts.server", "loadgen": "llmwatts.loadgen",
         "analysis": "llmwatts.analysis"}


def is_cli_module(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli") or dotted == "llmwatts.demo"


def modules():
    for folder, package in BOXES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            dotted = ".".join([package, *path.relative_to(REPO / folder).with_suffix("").parts])
            yield path, dotted.removesuffix(".__init__")


def imported(tree: ast.AST):
    """(module, line) of every import outside a ``main()`` (a program's entry point may parse its argv
    with the CLI it belongs to)."""
    def walk(node, in_main):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef):
                yield from walk(child, in_main or child.name == "main")
            elif isinstance(child, ast.Import) and not in_main:
                yield from ((a.name, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not in_main and child.module:
                yield child.module, child.lineno
                yield from ((f"{child.module}.{a.name}", child.lineno) for a in child.names)
            else:
                yield from walk(child, in_main)
    yield from walk(tree, False)


def test_libraries_never_import_cli_modules():
    """Guards: server/sharded.py imported server.cli (run_until_stopped); loadgen/sweep.py imported
    server.cap_cli."""
    offences = []
    for path, dotted in modules():
        if is_cli_module(dotted):
            continue
        for name, line in imported(ast.parse(path.read_text())):
            if name.startswith("llmwatts.") and is_cli_module(name):
                offences.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert offences == []


def test_one_channel_factory():
    """Guards: two channel factories (server/auth.py's and loadgen's) and two target parsers."""
    makers = []
    for path, dotted in modules():
        text = path.read_text()
        if dotted != "llmwatts.client" and ("grpc.insecure_channel(" in text or "grpc.secure_channel(" in text):
            makers.append(str(path.relative_to(REPO)))
    assert makers == []
