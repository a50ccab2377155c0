"""A Dockerfile read with BuildKit's own parser (the `dockerfile` package), as the facts the image tests check.

Pure: reading a Dockerfile touches nothing but that file, so the static tests stay fast and the install tests
replay exactly what the Dockerfile says.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import shlex
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PINNED_BASE = re.compile(r"^[^\s@:]+(/[^\s@:]+)*:[^\s@]+@sha256:[0-9a-f]{64}$")
# Options that say where pip looks for files. Under --require-hashes they cannot change which files install,
# so a replay on another machine drops them and uses that machine's configured indexes.
INDEX_OPTIONS = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f"}


@dataclasses.dataclass(frozen=True)
class Copy:
    """One COPY: sources relative to the build context (the repository root), dest inside the image."""

    sources: tuple[str, ...]
    dest: str
    line: int


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    bases: tuple[str, ...]
    labels: dict[str, str]
    env: dict[str, str]
    copies: tuple[Copy, ...]
    commands: tuple[tuple[str, ...], ...]  # every RUN split at `&&` into argv lists, in order
    user: str | None
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.labels["org.opencontainers.image.title"]

    def pip_installs(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.commands if argv[:2] == ("pip", "install")]

    def kvpilot_runs(self) -> list[tuple[str, ...]]:
        """Build steps that run the installed package itself (building the demo model)."""
        return [argv for argv in self.commands if argv[:1] == ("kvpilot",)]

    def lock(self) -> Path:
        """The repository file that the image installs with `pip install --require-hashes -r`."""
        (argv,) = [a for a in self.pip_installs() if "--require-hashes" in a]
        target = argv[argv.index("-r") + 1]
        (source,) = [c.sources[0] for c in self.copies if c.dest == target]
        return ROOT / source


def _commands(shell: str) -> list[tuple[str, ...]]:
    argv: list[str] = []
    out: list[tuple[str, ...]] = []
    for token in [*shlex.split(shell), "&&"]:
        if token == "&&":
            if argv:
                out.append(tuple(argv))
            argv = []
        else:
            argv.append(token)
    return out


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    """KEY VALUE pairs of LABEL and ENV, their values unquoted as the builder does."""
    return {k: " ".join(shlex.split(v)) for k, v in zip(values[::2], values[1::2], strict=True)}


def read(path: Path) -> Recipe:
    bases: list[str] = []
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    copies: list[Copy] = []
    commands: list[tuple[str, ...]] = []
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir = "/"
    for ins in dockerfile.parse_file(str(path)):
        if ins.cmd == "FROM":
            bases.append(ins.value[0])
        elif ins.cmd == "LABEL":
            labels.update(_pairs(ins.value))
        elif ins.cmd == "ENV":
            env.update(_pairs(ins.value))
        elif ins.cmd == "WORKDIR":
            workdir = posixpath.join(workdir, ins.value[0])
        elif ins.cmd in ("COPY", "ADD"):
            if any(f.startswith("--from") for f in ins.flags):
                continue  # from another stage or image, not the build context
            *sources, dest = ins.value
            copies.append(Copy(tuple(sources), posixpath.join(workdir, dest), ins.start_line))
        elif ins.cmd == "RUN":
            commands.extend(_commands(ins.value[0]) if not ins.json else [tuple(ins.value)])
        elif ins.cmd == "USER":
            user = ins.value[0]
        elif ins.cmd == "ENTRYPOINT":
            entrypoint = tuple(ins.value)
        elif ins.cmd == "CMD":
            cmd = tuple(ins.value)
    return Recipe(path, tuple(bases), labels, env, tuple(copies), tuple(commands), user, entrypoint, cmd)


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("Dockerfile.*"))


def without_index_options(argv: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in INDEX_OPTIONS:
            skip = True
        elif not any(token.startswith(f"{o}=") for o in INDEX_OPTIONS if o.startswith("--")):
            out.append(token)
    return out
