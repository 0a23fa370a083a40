"""tools/ and bench/ import the package (and bench/common.py), never one another through sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted((REPO / 'tools').rglob('*.py'))
BENCH = sorted((REPO / 'bench').glob('*.py'))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split('.')[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split('.')[0]))
    return out


def test_no_script_puts_a_path_on_sys_path():
    offenders = [
        f'{p.relative_to(REPO)}:{n.lineno}'
        for p in TOOLS + BENCH
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Call) and ast.unparse(n.func) in ('sys.path.insert', 'sys.path.append')
    ]
    assert offenders == []


def test_no_script_imports_another_script():
    scripts = {p.stem for p in TOOLS + BENCH} - {'common', '__init__'}
    offenders = [
        f'{p.relative_to(REPO)}:{line} imports {name}'
        for p in TOOLS + BENCH
        for line, name in _imports(p)
        if name in scripts or name == 'tools' or (name in ('bench', 'common') and p in TOOLS)
    ]
    assert offenders == []
