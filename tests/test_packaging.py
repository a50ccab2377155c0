"""The distribution maps the repository's folders under `kvpilot` and shadows nothing in the standard library."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_operator_is_stdlib_and_ours_is_namespaced() -> None:
    code = "import operator, kvpilot.operator as ours; print(operator.__file__); print(ours.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    stdlib, ours = out.stdout.split()
    assert "site-packages" not in stdlib and not stdlib.startswith(str(ROOT))
    assert Path(ours).parent == ROOT / "operator"


def test_subpackages_map_to_top_level_folders() -> None:
    for name, folder in [("engine", "engine"), ("kernels", "kernels"), ("operator", "operator"), ("tuner", "tuner")]:
        module = importlib.import_module(f"kvpilot.{name}")
        assert Path(module.__file__).parent == ROOT / folder


def test_every_python_folder_is_packaged() -> None:
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {
        "kvpilot": "kvpilot",
        "engine": "kvpilot.engine",
        "kernels": "kvpilot.kernels",
        "operator": "kvpilot.operator",
        "tuner": "kvpilot.tuner",
    }
    for top, package in mapping.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in declared, f"{init.parent} is not listed in pyproject's packages"


def test_generate_command_on_the_demo_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot", "generate", "--model", "demo", "Hello", "--max-tokens", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert '"finish_reason": "length"' in out.stdout


def test_generate_command_reports_bad_input() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot", "generate", "--model", "/nonexistent", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 2 and "does not exist" in out.stderr
