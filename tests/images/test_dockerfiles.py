"""Every Dockerfile under docker/ builds from what the repository has, pins its base by digest, runs as a
numeric non-root user and installs one complete hash lock; every image reference names an image built here."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from kvpilot.operator.chart_values import Image
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.spec import EngineSpec, parse_spec
from packaging.utils import canonicalize_name

from .locks import project_requirements, read_inputs, read_lock
from .recipe import PINNED_BASE, ROOT, Recipe, dockerfiles, read

RECIPES = {path.name: read(path) for path in dockerfiles()}
REGISTRY = "ghcr.io/kvpilot"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_four_images_are_built_here() -> None:
    """The engine for GPUs, the engine for CPU nodes (demo, e2e/kind), the operator and the router, each its own
    file."""
    assert {r.title for r in RECIPES.values()} == {"kvpilot-engine", "kvpilot-engine-cpu", "kvpilot-operator",
                                                   "kvpilot-router"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_copy_source_exists_in_the_build_context(name: str) -> None:
    recipe = RECIPES[name]
    missing = [(c.line, s) for c in recipe.copies for s in c.sources if not (ROOT / s).exists()]
    assert not missing, f"{name} copies what the repository root does not have: {missing}"
    # pyproject's package-dir is the list of source folders an image must carry to install kvpilot.
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {s for c in recipe.copies for s in c.sources}
    assert {d.split("/")[0] for d in package_dirs.values()} <= copied, f"{name} leaves out a source folder"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bases_are_pinned_by_digest(name: str) -> None:
    for base in RECIPES[name].bases:
        assert PINNED_BASE.match(base), f"{name}: FROM {base} is not image:tag@sha256:<digest>"


def test_every_image_starts_from_one_base() -> None:
    """One base (its digest in docker/README.md), so a security rebuild bumps one reference everywhere."""
    assert len({base for r in RECIPES.values() for base in r.bases}) == 1


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    """Numeric, so a pod's `runAsNonRoot: true` can verify it without a passwd lookup."""
    user = RECIPES[name].user
    assert user is not None and re.fullmatch(r"[0-9]+(:[0-9]+)?", user), f"{name}: USER {user}"
    assert all(int(part) != 0 for part in user.split(":")), f"{name} runs as root"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_installs_one_complete_hash_lock_then_kvpilot_without_dependencies(name: str) -> None:
    recipe = RECIPES[name]
    locked, kvpilot = recipe.pip_installs()
    assert {"--require-hashes", "--only-binary"} <= set(locked), "the lock installs hash-checked wheels only"
    assert "--no-deps" in kvpilot and "--no-build-isolation" in kvpilot, "kvpilot adds nothing beside the lock"
    lock = recipe.lock()
    assert lock.parent == ROOT / "docker" / "requirements" and lock.with_suffix(".in").is_file()
    entries = read_lock(lock)
    assert entries, f"{lock} is empty"
    for entry in entries.values():
        assert str(entry.requirement.specifier).startswith("==") and entry.hashes, f"{lock}: {entry.text}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lock_agrees_with_its_input_and_with_pyproject(name: str) -> None:
    """Each name an .in file asks for is locked (at its pin, if it has one) and is one pyproject declares; each
    locked version meets pyproject's floor. Regenerate with docker/lock.sh when this fails."""
    lock = RECIPES[name].lock()
    entries = read_lock(lock)
    declared = project_requirements()
    for wanted in read_inputs(lock.with_suffix(".in")):
        key = canonicalize_name(wanted.name)
        assert key in declared, f"{wanted.name} is not a pyproject dependency or build requirement"
        assert key in entries, f"{lock} lacks {wanted.name}: run docker/lock.sh"
        assert wanted.specifier.contains(entries[key].version, prereleases=True), f"{lock}: {wanted} moved"
    for key, requirement in declared.items():
        if key in entries:
            assert requirement.specifier.contains(entries[key].version, prereleases=True), (
                f"{lock} locks {key}=={entries[key].version}, outside pyproject's {requirement}"
            )


def _published(recipe: Recipe) -> str:
    return f"{REGISTRY}/{recipe.title}:{VERSION}"


def _is_cuda(recipe: Recipe) -> bool:
    torch = read_lock(recipe.lock()).get("torch")
    return torch is not None and "+cpu" not in torch.version


def test_chart_operator_spec_and_examples_name_images_built_here() -> None:
    by_title = {r.title: r for r in RECIPES.values()}
    chart = yaml.safe_load((ROOT / "charts" / "kvpilot" / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION, "the chart's default operator tag is its appVersion"
    values = yaml.safe_load((ROOT / "charts" / "kvpilot" / "values.yaml").read_text())["image"]
    assert values["repository"] == Image().repository == f"{REGISTRY}/kvpilot-operator"
    assert values["tag"] == "", "the tag defaults to appVersion"
    assert EngineSpec().image == _published(by_title["kvpilot-engine"])
    router = yaml.safe_load((ROOT / "charts" / "kvpilot" / "values.yaml").read_text())["router"]["image"]
    published_router = _published(by_title["kvpilot-router"])
    assert f"{router['repository']}:{VERSION}" == OperatorConfig().router_image == published_router
    assert router["tag"] == "", "the router's tag defaults to appVersion too"
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        spec = parse_spec(yaml.safe_load(example.read_text())["spec"])
        image = spec.engine.image
        recipe = next((r for r in RECIPES.values() if _published(r) == image), None)
        assert recipe is not None, f"{example.name}: {image} is not built by docker/"
        wants_gpu = spec.resources.gpus_per_replica > 0
        assert _is_cuda(recipe) == wants_gpu, f"{example.name}: {image} on {'GPU' if wants_gpu else 'CPU'} nodes"


def test_every_documented_docker_build_names_a_dockerfile_that_exists() -> None:
    docs = [p for p in ROOT.rglob("*") if p.suffix in (".md", ".sh") and not {"build", ".git"} & set(p.parts)]
    named = {(doc, m) for doc in docs for m in re.findall(r"docker build -f (\S+)", doc.read_text())}
    assert named, "the READMEs say how to build the images"
    missing = sorted((str(doc.relative_to(ROOT)), m) for doc, m in named if not (ROOT / m).is_file())
    assert not missing, f"docker build -f names a missing file: {missing}"


def test_documented_image_tags_are_the_published_names() -> None:
    """docker/README.md and each Dockerfile's own build line tag the image with the name the chart pulls."""
    for recipe in RECIPES.values():
        built = re.search(r"docker build -f (\S+) -t (\S+) \.", recipe.path.read_text())
        assert built and built.groups() == (f"docker/{recipe.path.name}", _published(recipe)), recipe.path.name
