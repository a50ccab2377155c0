"""A throwaway local Prometheus for `kvpilot tune`: the `prometheus` binary on a free port, scraping the engine.

Every trial serves on the same engine port (one trial at a time), so a static scrape config suffices;
trials are told apart by the `revision` label the engine puts on its series.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(target: str, interval_s: float) -> str:
    interval = f"{max(100, round(interval_s * 1000))}ms"
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  scrape_timeout: {interval}\n"
        "scrape_configs:\n"
        "  - job_name: kvpilot-tune\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )


@contextlib.contextmanager
def local_prometheus(target: str, interval_s: float = 0.5, binary: str = "prometheus",
                     ready_timeout_s: float = 30.0) -> Iterator[str]:
    """Run Prometheus scraping `target` (host:port); yields its URL and stops it (and its data) afterwards."""
    exe = shutil.which(binary)
    if exe is None:
        raise FileNotFoundError(f"no {binary!r} binary on PATH (Debian/Ubuntu: apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="kvpilot-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(scrape_config(target, interval_s))
        port = free_port()
        log = (Path(tmp) / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    log.flush()
                    tail = (Path(tmp) / "prometheus.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prometheus not ready within {ready_timeout_s:.0f} s")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
