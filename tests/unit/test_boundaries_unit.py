"""Each idea has one home: SQL in index.py, facts about the compilers' trees in layouts.py.

The package is read as source (ast), so a statement or a literal that strays
into another module fails here with its file and line, before it spreads.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mithrilfs"
SQL_HOME = "index.py"
LAYOUT_HOME = "layouts.py"
_SQL = re.compile(
    r"\b(SELECT\s.*\bFROM\b|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|WITH\s+RECURSIVE|PRAGMA\s)",
    re.DOTALL,
)
_EXECUTE = frozenset({"execute", "executemany", "executescript"})
# Path components and name prefixes of the Triton and inductor trees, and the
# stored form of cache-entry keys (b"d12", b"s7/stem", b"f99").
_LAYOUT_BYTES = (b"triton", b"inductor", b"fxgraph", b"aotautograd", b"tmp.", b"__grp__")
_ENTRY_KEY_FORMAT = re.compile(rb"^[dsf]%d")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def _constants(path: Path) -> Iterator[ast.Constant]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            yield node


def sql_outside_index(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (
                # A statement is the first argument (a Redis pipeline's
                # execute() takes none).
                (node.func.attr in _EXECUTE and bool(node.args))
                or (
                    node.func.attr == "connect"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "sqlite3"
                )
            )
        ):
            found.append(f"{path.name}:{node.lineno}: {node.func.attr}()")
    for constant in _constants(path):
        if isinstance(constant.value, str) and _SQL.search(constant.value):
            found.append(f"{path.name}:{constant.lineno}: {constant.value[:60]!r}")
    return found


def layout_literals_outside_layouts(path: Path) -> list[str]:
    found = []
    for constant in _constants(path):
        value = constant.value
        layout_bytes = isinstance(value, bytes) and bool(
            value.startswith(_LAYOUT_BYTES) or _ENTRY_KEY_FORMAT.match(value)
        )
        if layout_bytes or (isinstance(value, str) and "__grp__" in value):
            found.append(f"{path.name}:{constant.lineno}: {value!r}")
    return found


def test_the_check_sees_the_package() -> None:
    names = {path.name for path in modules()}
    assert {SQL_HOME, LAYOUT_HOME, "fsck.py", "stats.py", "classes.py", "fs.py"} <= names


@pytest.mark.parametrize("path", modules(), ids=lambda path: path.name)
def test_sql_lives_only_in_the_index(path: Path) -> None:
    if path.name == SQL_HOME:
        return
    assert sql_outside_index(path) == []


@pytest.mark.parametrize("path", modules(), ids=lambda path: path.name)
def test_layout_facts_live_only_in_layouts(path: Path) -> None:
    if path.name == LAYOUT_HOME:
        return
    assert layout_literals_outside_layouts(path) == []


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text(
        '"""A module that breaks both rules (docstrings may name SELECT x FROM y)."""\n'
        "def f(db, pipe):\n"
        '    db.execute("SELECT id FROM inodes")\n'
        "    pipe.execute()\n"
        '    return b"d%d" % 3, b"triton", "__grp__x.json"\n'
    )
    assert sorted(sql_outside_index(stray)) == [
        "stray.py:3: 'SELECT id FROM inodes'",
        "stray.py:3: execute()",
    ]
    assert sorted(layout_literals_outside_layouts(stray)) == [
        "stray.py:5: '__grp__x.json'",
        "stray.py:5: b'd%d'",
        "stray.py:5: b'triton'",
    ]


# -- imports run one way ------------------------------------------------------------------

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def layer_of_each_module() -> dict[str, int]:
    """Module (or package) name -> its row in docs/architecture.md's table of pieces.

    The table is the contract: a module imports only modules in its own row
    or below it.
    """
    pieces = ARCHITECTURE.read_text().split("## A request")[0]
    rows = [line for line in pieces.splitlines() if line.startswith("| `")]
    layers: dict[str, int] = {}
    for row_number, row in enumerate(rows):
        for name in re.findall(r"`([a-z_]+)(?:\.py|/)`", row.split("|")[1]):
            layers[name] = row_number
    return layers


def upward_imports(layers: dict[str, int]) -> list[str]:
    found = []
    for path in modules():
        importer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if importer in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.module):
                continue
            parts = node.module.split(".")
            if parts[0] != "mithrilfs":
                continue
            targets = parts[1:2] or [alias.name for alias in node.names]
            for target in targets:
                if target == importer or target.startswith("__"):
                    continue
                where = f"{path.relative_to(PACKAGE)}:{node.lineno} imports {target}"
                if importer not in layers or target not in layers:
                    found.append(f"{where}: not in docs/architecture.md's table")
                elif layers[target] < layers[importer]:
                    found.append(f"{where}, which is above it in docs/architecture.md")
    return found


def test_every_module_is_in_the_table_and_imports_only_downwards() -> None:
    assert upward_imports(layer_of_each_module()) == []


def test_the_import_check_finds_an_upward_import() -> None:
    layers = layer_of_each_module()
    layers["index"], layers["fs"] = layers["fs"], layers["index"]
    assert any("imports index" in problem for problem in upward_imports(layers))
