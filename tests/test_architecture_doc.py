"""docs/architecture.md stays true to the code (issue 18 item 1).

Guards against the doc drifting as files are split, moved and renamed (before this test its rows were
patched by hand after each split, and most source files had none):

- every ``.py`` file of the boxes (``protos/``, ``server/``, ``loadgen/``, ``analysis/``, ``llmwatts/``,
  ``bench/``) is named in the first cell of a table row (its one job beside it), so a new file without a
  row fails;
- every backticked ``path/file.py`` exists, and every ``path/file.py:Name`` / ``path/file.py:Class.member``
  is defined in that file;
- every backticked ``Class.member``, ``name()``, ``module.name`` of ours and ``Message.field`` /
  ``Service.Rpc`` of the proto is defined where it says (read with ``ast``: no module is imported);
- the import drawing (the mermaid block marked ``%% imports``) has exactly the arrows the code has.

Run as a script (``python tests/test_architecture_doc.py``) it prints the code's box-to-box imports with
the files behind each arrow: what to redraw the import picture from.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PROTO = REPO / "protos" / "llmwatts" / "v1" / "llmwatts.proto"
FOLDERS = ("protos", "server", "loadgen", "analysis", "llmwatts", "bench")
# pyproject.toml's package-dir: package prefix -> folder
PACKAGE_DIR = {"llmwatts.v1": "protos/llmwatts/v1", "llmwatts.server": "server", "llmwatts.loadgen": "loadgen",
               "llmwatts.analysis": "analysis", "llmwatts": "llmwatts"}
# Names of other projects the doc may write as Class.member or name() (not ours, so not checked; another
# library's lowercase module.name, like time.time_ns(), needs no entry).
EXTERNAL = {"Environment.runner", "init_gevent()", "nvmlDeviceGetTotalEnergyConsumption()"}


# --- the code ---------------------------------------------------------------------------------------------

@cache
def source_files() -> tuple[Path, ...]:
    return tuple(sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py")))


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def dotted_of(path: Path) -> str:
    r = rel(path)
    for package, folder in sorted(PACKAGE_DIR.items(), key=lambda kv: -len(kv[1])):
        if r.startswith(folder + "/"):
            rest = Path(r[len(folder) + 1:]).with_suffix("").parts
            return ".".join([package, *rest]).removesuffix(".__init__")
    return ".".join(Path(r).with_suffix("").parts)  # bench/: scripts, imported as siblings


def path_of_module(dotted: str) -> Path | None:
    """The file of one of our modules (``llmwatts.server.batcher`` -> server/batcher.py), or None."""
    for package, folder in sorted(PACKAGE_DIR.items(), key=lambda kv: -len(kv[0])):
        if dotted == package or dotted.startswith(package + "."):
            base = REPO / folder / Path(*dotted[len(package):].lstrip(".").split(".")) if dotted != package \
                else REPO / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def node_of(path: Path) -> str:
    """The box a file is drawn in. ``llmwatts/`` is two: its commands (the CLI modules, ``demo.py`` and the
    ``study/`` orchestration) and its core (what every box shares: errors, client, stats, ...)."""
    top = rel(path).split("/")[0]
    if top != "llmwatts":
        return top
    dotted = dotted_of(path)
    last = dotted.rsplit(".", 1)[-1]
    if dotted.startswith("llmwatts.study") or last == "cli" or last.endswith("_cli") or dotted == "llmwatts.demo":
        return "commands"
    return "core"


@cache
def tree_of(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_files(path: Path):
    """Our files ``path`` imports (anywhere in it: a lazy import inside a function is a dependency too)."""
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from llmwatts.server import gpu`` imports the module llmwatts.server.gpu; ``from x import f`` x
            names = [f"{node.module}.{a.name}" if path_of_module(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            target = path_of_module(name)
            if target is not None:
                yield target


def code_arrows() -> dict[tuple[str, str], set[str]]:
    """(box, box) -> the files whose imports draw that arrow."""
    arrows: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in source_files():
        for target in imported_files(path):
            a, b = node_of(path), node_of(target)
            if a != b:
                arrows[(a, b)].add(f"{rel(path)} -> {rel(target)}")
    return arrows


def members(node: ast.ClassDef | ast.Module) -> dict[str, ast.AST]:
    """Names a module or class body defines: functions, classes, assignments, annotated fields."""
    found: dict[str, ast.AST] = {}
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[child.name] = child
        elif isinstance(child, ast.Assign):
            for t in child.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        found[n.id] = child
        elif isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
            found[child.target.id] = child
        elif isinstance(child, (ast.If, ast.Try)):  # names defined under a guard
            for sub in ast.walk(child):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    found.setdefault(sub.name, sub)
    if isinstance(node, ast.ClassDef):  # attributes set in __init__ (self.x = ...)
        init = found.get("__init__")
        if isinstance(init, ast.FunctionDef):
            for n in ast.walk(init):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" \
                        and isinstance(n.ctx, ast.Store):
                    found.setdefault(n.attr, n)
    return found


def defined_in(path: Path, qualname: str, reexports: bool = False) -> bool:
    """``qualname`` (``f``, ``Class``, ``Class.method``) is defined in ``path``. A name the module imports
    from another of ours (a re-export: ``llmwatts.server.gpu.GpuSample``) counts only with ``reexports``:
    ``path/file.py:Name`` says where a thing is defined."""
    parts = qualname.split(".")
    tree = tree_of(path)
    if reexports and parts[0] not in members(tree):
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmwatts"):
                for alias in node.names:
                    if (alias.asname or alias.name) == parts[0]:
                        source = path_of_module(node.module)
                        return source is not None and defined_in(source, ".".join([alias.name, *parts[1:]]), True)
        return False
    scope: ast.AST = tree
    for part in parts:
        if not isinstance(scope, (ast.Module, ast.ClassDef)):
            return False
        scope = members(scope).get(part)
        if scope is None:
            return False
    return True


def modules_named(dotted: str) -> list[Path]:
    """Our modules whose import path is ``dotted`` or ends with it (``records``: server's and loadgen's)."""
    return [p for p in source_files() if (d := dotted_of(p)) == dotted or d.endswith("." + dotted)]


@cache
def code_index() -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Where each class and each function (or method) is defined: name -> files."""
    classes: dict[str, list[Path]] = defaultdict(list)
    functions: dict[str, list[Path]] = defaultdict(list)
    for path in source_files():
        for node in ast.walk(tree_of(path)):
            if isinstance(node, ast.ClassDef):
                classes[node.name].append(path)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[node.name].append(path)
    return classes, functions


def class_has(name: str, member: str) -> bool:
    classes, _ = code_index()
    for path in classes.get(name, ()):
        for node in ast.walk(tree_of(path)):
            if isinstance(node, ast.ClassDef) and node.name == name:
                if member in members(node):
                    return True
                # inherited from one of our classes (ContinuousBatcher.submit is Batcher's)
                if any(isinstance(b, ast.Name) and b.id != name and class_has(b.id, member) for b in node.bases):
                    return True
    return False


@cache
def proto_names() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The wire contract's messages with their fields, and services with their RPCs."""
    text = re.sub(r"//[^\n]*", "", PROTO.read_text(encoding="utf-8"))
    messages: dict[str, set[str]] = {}
    services: dict[str, set[str]] = {}
    for kind, name, body in re.findall(r"\b(message|service)\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
        if kind == "message":
            messages[name] = set(re.findall(r"^\s*(?:repeated\s+|optional\s+)?[\w.]+\s+(\w+)\s*=", body, re.M))
        else:
            services[name] = set(re.findall(r"\brpc\s+(\w+)", body))
    return messages, services


# --- the doc ----------------------------------------------------------------------------------------------

def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def backticked(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are drawings and commands, not names
    return re.findall(r"`([^`\n]+)`", text)


FILE_EXTENSIONS = {"csv", "md", "html", "pyi", "toml", "json", "jsonl", "db", "proto", "png", "sh", "txt"}
NODE_ID = re.compile(r"^((?:[\w.-]+/)*[\w-]+\.py)::(\w+)$")
OTHER_FILE = re.compile(r"^(?:[\w.-]+/)+[\w.-]+\.\w+$|^pyproject\.toml$|^Makefile$")
SIGNATURE = re.compile(r"^([A-Za-z_][\w.]*)\([^`]*$")
PATH_NAME = re.compile(r"^((?:[\w.-]+/)*[\w-]+\.py)(?::([A-Za-z_][\w.]*))?$")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(\))?$")


def check_reference(token: str) -> str | None:
    """Why ``token`` (a backticked span of the doc) names nothing of ours, or None when it holds (or is not
    a name this test checks: prose, a command, a column)."""
    if token in EXTERNAL:
        return None
    m = NODE_ID.match(token)  # tests/x.py::test_name
    if m:
        file, name = m.groups()
        path = REPO / file
        return None if path.is_file() and defined_in(path, name) else f"no test {name} in {file}"
    m = OTHER_FILE.match(token)  # bench/results.sh, protos/llmwatts/v1/llmwatts.proto
    if m and not token.endswith(".py"):
        return None if (REPO / token).is_file() else f"{token} does not exist"
    m = SIGNATURE.match(token)  # create_server(config) -> (server, port): the name before the parenthesis
    if m and not token.endswith("()"):
        return check_reference(m.group(1) + "()")
    m = PATH_NAME.match(token)
    if m:
        file, name = m.groups()
        if "/" not in file:  # a bare basename: some file of the tree has it
            return None if any(p.name == file for p in source_files()) or list(REPO.glob(f"tests/**/{file}")) \
                else f"no file named {file}"
        path = REPO / file
        if not path.is_file():
            return f"{file} does not exist"
        if name and not defined_in(path, name):
            return f"{file} defines no {name}"
        return None
    m = DOTTED.match(token)
    if not m:
        return None
    name, call = m.groups()
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in FILE_EXTENSIONS:  # a file name (runs.csv, report.html), not a name
        return None
    classes, functions = code_index()
    messages, services = proto_names()
    if name.startswith("llmwatts.") or name == "llmwatts":  # a module path, or module.attribute
        for cut in range(len(parts), 0, -1):
            path = path_of_module(".".join(parts[:cut]))
            if path is not None:
                rest = ".".join(parts[cut:])
                return None if not rest or defined_in(path, rest, reexports=True) \
                    else f"{'.'.join(parts[:cut])} defines no {rest}"
        return f"no module {name}"
    if len(parts) == 1:
        if call:
            return None if name in functions or name in classes else f"nothing of ours defines {name}()"
        return None  # a bare word: a column, a flag's value, a table
    head, member = parts[0], ".".join(parts[1:])
    if head in messages or head in services:
        known = messages.get(head, set()) | services.get(head, set())
        return None if len(parts) == 2 and member in known else f"the proto's {head} has no {member}"
    if head in classes:
        return None if len(parts) == 2 and class_has(head, member) else f"class {head} has no {member}"
    if head[0].isupper():
        return f"no class {head} in the code (add it to EXTERNAL if it is another project's)"
    for cut in range(len(parts) - 1, 0, -1):  # module.name, package.module.name (gpu.X, loadgen.records.X)
        found = modules_named(".".join(parts[:cut]))
        if found:
            rest = ".".join(parts[cut:])
            if any(defined_in(p, rest, reexports=True) for p in found):
                return None
            return f"no module {'.'.join(parts[:cut])} defines {rest}"
    return None  # another library's module (time.time_ns), a table.column


def doc_import_arrows(text: str) -> set[tuple[str, str]]:
    blocks = [b for b in re.findall(r"```mermaid\n(.*?)```", text, re.S) if "%% imports" in b]
    assert len(blocks) == 1, "docs/architecture.md needs exactly one mermaid block marked '%% imports'"
    arrows = set()
    for line in blocks[0].splitlines():
        m = re.match(r"^\s*(\w+)(?:\[[^\]]*\])?\s*-->(?:\|[^|]*\|)?\s*(\w+)", line)
        if m:
            arrows.add(m.groups())
    return arrows


# --- the tests --------------------------------------------------------------------------------------------

def test_every_source_file_has_a_row():
    """A new file without a line in the doc fails here (guards: the doc lagged every split of issue 18)."""
    first_cells = [line.split("|")[1] for line in doc_text().splitlines() if line.startswith("|")]
    named = {t for cell in first_cells for t in backticked(cell)}
    missing = [rel(p) for p in source_files() if rel(p) not in named]
    assert missing == [], f"docs/architecture.md has no row for: {missing} (add one line: its one job)"


def test_every_name_in_the_doc_exists():
    """Guards: names in the doc that the code no longer has (a rename, a move, a typo)."""
    wrong = sorted({f"`{t}`: {why}" for t in backticked(doc_text()) if (why := check_reference(t))})
    assert wrong == [], "docs/architecture.md names what the code does not define:\n" + "\n".join(wrong)


def test_the_import_drawing_is_the_code():
    """Guards: an import between boxes that the picture does not show, or an arrow the code dropped.
    ``bench/`` (scripts) may import any box and is not drawn; no box may import it."""
    arrows = code_arrows()
    assert not [a for a in arrows if a[1] == "bench"], f"a box imports bench/: {arrows}"
    drawn, code = doc_import_arrows(doc_text()), {k: v for k, v in arrows.items() if k[0] != "bench"}
    undrawn = {f"{a} --> {b}: {sorted(code[(a, b)])[:3]}" for a, b in set(code) - drawn}
    gone = {f"{a} --> {b}" for a, b in drawn - set(code)}
    assert not undrawn and not gone, (f"arrows in the code but not in the drawing: {sorted(undrawn)}; "
                                      f"in the drawing but not in the code: {sorted(gone)}")


def test_the_checks_can_fail():
    """The checker itself: a wrong file, a wrong name, a wrong member and a wrong proto field are caught."""
    assert check_reference("server/batcher.py:Batcher._run_batch") is None
    assert check_reference("server/batcher.py:Batcher.run_batch")
    assert check_reference("server/no_such_file.py")
    assert check_reference("Work.row") is None and check_reference("Work.rows")
    assert check_reference("attribute()") is None and check_reference("atribute()")
    assert check_reference("records.attribute") is None and check_reference("records.atribute")
    assert check_reference("GenerateRequest.request_id") is None and check_reference("GenerateRequest.req_id")
    assert check_reference("Inference.GenerateStream") is None and check_reference("Control.Generate")
    assert check_reference("llmwatts.server.gpu.open_gpus") is None and check_reference("llmwatts.server.gpu.open")
    assert check_reference("ContinuousBatcher.submit") is None  # inherited from Batcher
    assert check_reference("create_server(config) -> (server, port)") is None
    assert check_reference("create_servers(config) -> (server, port)")
    assert check_reference("bench/results.sh") is None and check_reference("bench/result.sh")
    assert check_reference("tests/test_docs.py::test_readme_command_parses") is None
    assert check_reference("tests/test_docs.py::test_readme_commands_parse")
    assert doc_import_arrows("```mermaid\nflowchart TD\n%% imports\n  a --> b\n  c -->|x| d\n```") == {("a", "b"),
                                                                                                      ("c", "d")}


if __name__ == "__main__":
    for (a, b), files in sorted(code_arrows().items()):
        print(f"{a} --> {b}")
        for f in sorted(files):
            print(f"    {f}")
    sys.exit(0)
