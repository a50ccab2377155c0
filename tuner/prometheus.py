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


class PrometheusProcess:
    """The `prometheus` binary on a free loopback port, with a config file; the one launcher, for `kvpilot tune`
    and the e2e harness alike."""

    def __init__(self, config: Path, data_dir: Path, log_path: Path, binary: str = "prometheus") -> None:
        exe = shutil.which(binary)
        if exe is None:
            raise FileNotFoundError(f"no {binary!r} binary on PATH (Debian/Ubuntu: apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                self._log.flush()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within {timeout_s:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def local_prometheus(target: str, interval_s: float = 0.5, binary: str = "prometheus",
                     ready_timeout_s: float = 30.0) -> Iterator[str]:
    """Run Prometheus scraping `target` (host:port); yields its URL and stops it (and its data) afterwards."""
    with tempfile.TemporaryDirectory(prefix="kvpilot-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(scrape_config(target, interval_s))
        prometheus = PrometheusProcess(config, Path(tmp) / "data", Path(tmp) / "prometheus.log", binary)
        try:
            prometheus.wait_ready(ready_timeout_s)
            yield prometheus.url
        finally:
            prometheus.stop()
