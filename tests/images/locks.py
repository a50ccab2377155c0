"""Hash-locked requirements files (docker/requirements/*.txt) and their inputs (*.in), read as data."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .recipe import ROOT

HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# Wheels that only a CUDA machine can use: torch's CUDA build, Triton, and the CUDA libraries it loads.
CUDA_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # canonical
    requirement: Requirement
    hashes: int
    text: str  # the entry as written, with its hashes and `# via` notes

    @property
    def version(self) -> str:
        (spec,) = self.requirement.specifier
        return spec.version


def read_lock(path: Path) -> dict[str, Entry]:
    """Entries by canonical name. Every requirement line starts an entry; indented lines continue it."""
    blocks: list[list[str]] = []
    for line in path.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    entries: dict[str, Entry] = {}
    for block in blocks:
        text = "\n".join(block) + "\n"
        requirement = Requirement(block[0].rstrip("\\ ").strip())
        entries[canonicalize_name(requirement.name)] = Entry(
            canonicalize_name(requirement.name), requirement, len(HASH.findall(text)), text
        )
    return entries


def read_inputs(path: Path) -> list[Requirement]:
    """The requirements an .in file names, following `-r` includes."""
    out: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out.extend(read_inputs(path.parent / line[3:].strip()))
        elif line:
            out.append(Requirement(line))
    return out


def project_requirements() -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies and build requirements: the floors every image lock must meet."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["project"]["dependencies"] + project["build-system"]["requires"]
    return {canonicalize_name(r.name): r for r in map(Requirement, declared)}


def write_lock(path: Path, entries: list[Entry], why: str) -> None:
    path.write_text(f"# {why}\n" + "".join(e.text for e in entries))
