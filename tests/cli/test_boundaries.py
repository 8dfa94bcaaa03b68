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


def private_server_names(tree: ast.AST):
    """(``module.name``, line) of every private (``_``-prefixed) name or module of ``llmwatts.server`` that
    ``tree`` imports or reads off an imported server module (``auth._read``); lazy imports and ``main()``
    included."""
    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split(".")[2:])

    def of_server(dotted: str) -> bool:
        return dotted == "llmwatts.server" or dotted.startswith("llmwatts.server.")

    modules_as = {}  # local name -> the server module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            modules_as.update({a.asname: a.name for a in node.names if a.asname and of_server(a.name)})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if of_server(node.module):
                modules_as.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        else:
            continue
        yield from ((name, node.lineno) for name in names if of_server(name) and private(name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules_as:
            name = f"{modules_as[node.value.id]}.{node.attr}"
            if private(name):
                yield name, node.lineno


def test_no_box_imports_a_private_server_name():
    """Guards: llmwatts/client.py (the shared core) imported server/auth.py's private ``_read`` to read its
    TLS files; client-side token and TLS file reading now lives in llmwatts/credentials.py, which
    server/auth.py imports. Covers every box outside server/ and bench/."""
    offences = []
    for path in sorted(p for folder in ("llmwatts", "loadgen", "analysis", "bench") for p in (REPO / folder).rglob("*.py")):
        for name, line in private_server_names(ast.parse(path.read_text())):
            offences.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert offences == []
