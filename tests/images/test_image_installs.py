"""Each image's Python environment, built on this machine the way its Dockerfile builds it (replay.py): a fresh
venv, the locked requirements with --require-hashes, kvpilot with --no-deps; then its entrypoint must start.

The operator image runs in every `pytest`. The router's (a minute: transformers and numpy) is marked slow, and
so are the engine images, which install torch. The CUDA engine's lock cannot install on a CPU machine as a whole
(torch's CUDA build and its CUDA library wheels, about 3 GB compressed, need an NVIDIA driver to load), so its
test installs the rest of that lock, hash for hash, with the CPU image's locked torch of the same version in
their place.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from .locks import CUDA_ONLY, read_lock, write_lock
from .recipe import DOCKER, ROOT, Recipe, read
from .replay import build, host, image_env, run_in_image, venv

SERVE_READY_TIMEOUT_S = 180
IMPORT_OPERATOR = (
    "import sys, kvpilot.operator.main, kvpilot.operator.cli\n"
    "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))"
)


def _python(recipe: Recipe, root: Path, code: str) -> subprocess.CompletedProcess:
    return run_in_image(recipe, root, [str(venv(recipe, root) / "bin" / "python"), "-c", code])


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def _built_without_torch(dockerfile: str, root: Path, imports: str, command: str) -> Recipe:
    """The image built from its lock: `imports` load none of the other parts' stacks, torch is absent, and the
    entrypoint is `kvpilot <command>`."""
    recipe = read(DOCKER / dockerfile)
    build(recipe, root)
    imported = _ok(_python(recipe, root, imports))
    assert imported.strip() == "[]", f"{command} imported another part's stack: {imported}"
    missing = _python(recipe, root, "import torch")
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr, f"torch is in {dockerfile}"
    assert recipe.entrypoint == ("kvpilot",) and recipe.cmd[0] == command
    return recipe


def test_operator_image_installs_its_lock_and_imports_its_entrypoint(tmp_path: Path) -> None:
    recipe = _built_without_torch("Dockerfile.operator", tmp_path, IMPORT_OPERATOR, "operator")
    _ok(run_in_image(recipe, tmp_path, [*recipe.entrypoint, recipe.cmd[0], "--help"]))
    crd = yaml.safe_load(_ok(run_in_image(recipe, tmp_path, [*recipe.entrypoint, "crd"])))
    assert crd["kind"] == "CustomResourceDefinition"


IMPORT_ROUTER = (
    "import sys, kvpilot.router.app, kvpilot.router.cli, kvpilot.router.kube_source, kvpilot.router.tokenizer\n"
    "print(sorted(m for m in ('torch', 'fastapi', 'kopf', 'optuna') if m in sys.modules))"
)


@pytest.mark.slow
def test_router_image_installs_its_lock_and_routes_with_the_demo_tokenizer(tmp_path: Path) -> None:
    """The router's imports, and nothing of the engine's or the operator's stack; `kvpilot router` as the operator
    runs it (the demo tokenizer built into the image) answers /ready, holds a completion for an engine that is not
    there and answers 503 with Retry-After, serves its metrics, and exits cleanly on SIGTERM."""
    recipe = _built_without_torch("Dockerfile.router", tmp_path, IMPORT_ROUTER, "router")
    port, absent = _free_port(), _free_port()
    argv = [*recipe.entrypoint, "router", "--host", "127.0.0.1", "--port", str(port), "--tokenizer", "demo",
            "--backend", f"http://127.0.0.1:{absent}", "--queue-timeout-s", "0.5"]
    with _running(recipe, tmp_path, argv, port, "/ready", 60) as (url, log):
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 503 and reply.headers["Retry-After"], reply.text
        assert reply.json()["error"]["code"] == "no_engine"
        assert "kvpilot:router_prompt_tokens_total" in httpx.get(f"{url}/metrics", timeout=5).text
        assert "no --tokenizer" not in log.read_text(), "the demo tokenizer was not found in the image"


@contextlib.contextmanager
def _running(recipe: Recipe, root: Path, argv: list[str], port: int, probe: str, timeout_s: float
             ) -> Iterator[tuple[str, Path]]:
    """The image's command on loopback until `probe` answers 200; yields (its URL, its log). On leaving, SIGTERM
    must drain it to a clean exit."""
    log = root / f"{argv[1]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, env=image_env(recipe, root), stdout=out, stderr=subprocess.STDOUT, cwd=host(root, "/home/kvpilot")
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"{argv[1]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{argv[1]}: {probe} did not answer 200"
            try:
                if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, log.read_text()[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_as_the_image_does(recipe: Recipe, root: Path) -> None:
    """ENTRYPOINT + CMD on loopback: /health turns 200, a chat completion on the built-in demo model works,
    and SIGTERM drains it to a clean exit."""
    port = _free_port()
    argv = [*recipe.entrypoint, *recipe.cmd]
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    with _running(recipe, root, argv, port, "/health", SERVE_READY_TIMEOUT_S) as (url, _):
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_cpu_engine_image_installs_its_lock_builds_the_demo_model_and_serves(tmp_path: Path) -> None:
    recipe = read(DOCKER / "Dockerfile.engine-cpu")
    build(recipe, tmp_path)
    demo = host(tmp_path, recipe.env["KVPILOT_CACHE_DIR"])
    assert any(demo.glob("demo-model-*/config.json")), "the image's build step left no demo model"
    _serve_as_the_image_does(recipe, tmp_path)


@pytest.mark.slow
def test_cuda_engine_image_lock_without_its_cuda_wheels_installs_and_imports_the_server(tmp_path: Path) -> None:
    recipe, cpu_lock = read(DOCKER / "Dockerfile.engine"), read(DOCKER / "Dockerfile.engine-cpu").lock()
    cpu_torch = read_lock(cpu_lock)["torch"]
    entries = read_lock(recipe.lock())
    dropped = sorted(name for name in entries if CUDA_ONLY.match(name))
    assert "torch" in dropped and "triton" in dropped and any(n.startswith("nvidia-") for n in dropped)
    assert cpu_torch.version.split("+")[0] == entries["torch"].version, "the CPU stand-in is another torch"
    (copied,) = [c.dest for c in recipe.copies if c.sources == (str(recipe.lock().relative_to(ROOT)),)]
    kept = [e for name, e in entries.items() if not CUDA_ONLY.match(name)]
    why = f"{recipe.lock().name} less {', '.join(dropped)}; torch from {cpu_lock.name}"

    def cpu_subset(root: Path) -> None:
        write_lock(host(root, copied), [*kept, cpu_torch], why)

    build(recipe, tmp_path, adjust=cpu_subset)
    _ok(_python(recipe, tmp_path, "import kvpilot.engine.server.app, kvpilot.engine.server.loadgen"))
    demo = host(tmp_path, recipe.env["KVPILOT_CACHE_DIR"])
    assert any(demo.glob("demo-model-*/config.json")), "the image's build step left no demo model"
    for argv in (["serve", "--help"], ["bench", "serve", "--help"]):
        _ok(run_in_image(recipe, tmp_path, [*recipe.entrypoint, *argv]))
