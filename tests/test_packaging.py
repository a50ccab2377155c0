"""The distribution maps the repository's folders under `kvpilot` and shadows nothing in the standard library."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_operator_folder_never_shadows_the_standard_library() -> None:
    """operator/ has no __init__.py, so even with the repo root first on sys.path (`python -m` from the
    root, before anything imported the standard library's operator) it cannot be found as `operator`."""
    assert not (ROOT / "operator" / "__init__.py").exists()
    code = "import sys; sys.path.insert(0, sys.argv[1]); import operator; print(operator.__file__, operator.eq)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    assert not out.stdout.startswith(str(ROOT))
    ours = importlib.import_module("kvpilot.operator.spec")
    assert Path(ours.__file__).resolve().parent == ROOT / "operator"


def test_subpackages_map_to_top_level_folders() -> None:
    for name, folder in [("engine", "engine"), ("kernels", "kernels"), ("tuner", "tuner"), ("router", "router")]:
        module = importlib.import_module(f"kvpilot.{name}")
        assert Path(module.__file__).resolve().parent == ROOT / folder


def test_every_python_folder_is_packaged() -> None:
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {
        "kvpilot": "kvpilot",
        "engine": "kvpilot.engine",
        "kernels": "kvpilot.kernels",
        "operator": "kvpilot.operator",
        "tuner": "kvpilot.tuner",
        "router": "kvpilot.router",
    }
    for top, package in mapping.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in declared, f"{init.parent} is not listed in pyproject's packages"


@pytest.mark.parametrize("precision", [[], ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]])
def test_generate_command_on_the_demo_model(precision: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot", "generate", "--model", "demo", "Hello", "--max-tokens", "5", "--json",
         *precision],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert '"finish_reason": "length"' in out.stdout
    if precision:  # the CPU reference path: FP8 weights and an e4m3 KV cache, said in the log
        assert "fp8 e4m3 weights" in out.stderr and "fp8 e4m3 with calibrated per-head scales" in out.stderr


def test_generate_command_reports_bad_input() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot", "generate", "--model", "/nonexistent", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 2 and "does not exist" in out.stderr
