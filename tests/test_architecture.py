"""The package layout is a contract (pyproject.toml, checked by ``lint-imports`` in CI): this proves it holds, and
that it would catch the imports it forbids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import REPO, require_tool

LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    tool = require_tool(LINT if Path(LINT).exists() else None, "import-linter (pip install import-linter; dev extra)")
    return subprocess.run([tool, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("server", "models", "inflation", "ctseg"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "bundles"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_repository_keeps_its_contracts():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_build(tmp_path):
    root = _copy(tmp_path)
    (root / "server" / "core" / "shortcut.py").write_text("from server.jobs.model import Job  # core may not\n")
    proc = _lint(root)
    assert proc.returncode != 0
    assert "server.core.shortcut -> server.jobs.model" in proc.stdout


def test_a_route_reaching_into_the_store_breaks_the_build(tmp_path):
    root = _copy(tmp_path)
    routes = root / "server" / "api" / "routes" / "health.py"
    routes.write_text(routes.read_text() + "\nfrom server.jobs.sql_store import SqlJobStore  # noqa\n")
    proc = _lint(root)
    assert proc.returncode != 0
    assert "server.api is not allowed to import server.jobs.sql_store" in proc.stdout
