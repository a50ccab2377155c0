"""Replays a Dockerfile's Python steps on this machine: no Docker, the same files, the same pip commands.

The image's filesystem is a temporary directory (`root`): COPY puts the build context's files there, the venv
goes where the image's VIRTUAL_ENV says, and each `pip install` and `kvpilot` build step runs as written, with
container paths mapped under `root`. OS steps (apt-get, useradd) are not replayed. pip uses this machine's
configured indexes and its own wheel cache, so a second run downloads nothing; --require-hashes still decides
which files may install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .recipe import ROOT, Recipe, without_index_options

INSTALL_TIMEOUT_S = 900
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def host(root: Path, container_path: str) -> Path:
    return root / container_path.lstrip("/")


def stage_copies(recipe: Recipe, root: Path) -> None:
    """COPY as Docker does it: a directory's contents go into dest; files into dest/ when dest is a folder."""
    for copy in recipe.copies:
        dest = host(root, copy.dest)
        into_folder = copy.dest.endswith("/") or len(copy.sources) > 1
        for source in copy.sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, dest, ignore=IGNORED, dirs_exist_ok=True)
            else:
                target = dest / src.name if into_folder else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


def image_env(recipe: Recipe, root: Path) -> dict[str, str]:
    """The image's ENV with its absolute paths under `root`; PATH starts at the venv, HOME is the user's."""
    env = {"LANG": "C.UTF-8", "HOME": str(host(root, "/home/kvpilot")), "OMP_NUM_THREADS": "1"}
    for key, value in recipe.env.items():
        if key != "PATH":
            env[key] = str(host(root, value)) if value.startswith("/") else value
    env["PATH"] = f"{venv(recipe, root) / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def venv(recipe: Recipe, root: Path) -> Path:
    return host(root, recipe.env["VIRTUAL_ENV"])


def _pip_env() -> dict[str, str]:
    """This machine's pip settings (indexes, certificates, cache), nothing of the running test's own venv."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE_DIR")}


def _mapped(root: Path, argv: list[str]) -> list[str]:
    return [str(host(root, a)) if a.startswith("/") else a for a in argv]


def build(recipe: Recipe, root: Path, adjust: Callable[[Path], None] | None = None) -> Path:
    """Stage the COPYs, create the venv, run the pip installs and kvpilot build steps; returns the venv.

    `adjust(root)` runs after staging and before the installs, for a test that must install a named subset.
    """
    stage_copies(recipe, root)
    if adjust is not None:
        adjust(root)
    env_dir = venv(recipe, root)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = str(env_dir / "bin" / "python")
    for argv in recipe.pip_installs():
        pip = [python, "-m", "pip", *_mapped(root, without_index_options(argv)[1:])]
        done = subprocess.run(pip, env=_pip_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for argv in recipe.kvpilot_runs():
        done = subprocess.run(
            _mapped(root, list(argv)),
            env=image_env(recipe, root),
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            cwd=root,
        )
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}"
    return env_dir


def run_in_image(recipe: Recipe, root: Path, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        env=image_env(recipe, root),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=host(root, "/home/kvpilot"),
    )
