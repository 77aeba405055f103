"""Package layering that import-linter cannot see: the converter lives in the top-level convert/
folder (installed as qvl_jax.convert) and may import only the floor (config, errors)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _qvl_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("qvl_jax", "convert")}


def test_converter_imports_only_the_floor():
    allowed = {"qvl_jax.config", "qvl_jax.errors"}
    for f in sorted((ROOT / "convert").glob("*.py")):
        for mod in _qvl_imports(f):
            assert mod in allowed or mod.startswith("qvl_jax.convert"), f"{f.name} imports {mod}"


def test_no_top_level_convert_package_is_installed():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "convert" not in cfg["packages"] and cfg["package-dir"]["qvl_jax.convert"] == "convert"
