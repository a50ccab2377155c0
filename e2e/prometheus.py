"""A real Prometheus (Debian's `prometheus`) scraping every pod the node runs, through file_sd.

The node rewrites the target file as pods come and go; each target carries what a Kubernetes scrape
configuration takes from the pod's metadata (operator/resources.py SERIES_LABELS): its namespace, its
InferenceService and its revision, and its name. `honor_labels: false`, so a pod cannot claim another
tenant's labels: a label it reports itself under one of those names is kept as `exported_<name>`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from kvpilot.operator.resources import LABEL_ISVC, LABEL_REVISION

from e2e.pod import PodRunner, free_port

SCRAPE_INTERVAL_S = 1.0
SCRAPE_INTERVAL = f"{SCRAPE_INTERVAL_S:g}s"


class Prometheus:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("the Debian package `prometheus` is not installed (apt-get install -y prometheus)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.targets_path = workdir / "targets.json"
        self.process: subprocess.Popen[bytes] | None = None
        self._last: list[dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.write_targets([])
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {
                    "job_name": "kvpilot-engine",
                    "honor_labels": False,
                    "file_sd_configs": [{"files": [str(self.targets_path)], "refresh_interval": "1s"}],
                }
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = (self.workdir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"prometheus exited {self.process.returncode}; see {self.workdir}/prometheus.log"
                    )
                try:
                    if (await http.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("prometheus did not become ready in 20 s")

    def write_targets(self, runners: list[PodRunner], labels: dict[str, dict[str, str]] | None = None,
                      namespace: str = "") -> None:
        def target(r: PodRunner) -> dict[str, str]:
            pod = (labels or {}).get(r.name, {})
            return {"pod": r.name, "namespace": namespace, "inferenceservice": pod.get(LABEL_ISVC, ""),
                    "revision": pod.get(LABEL_REVISION, "")}

        groups = [{"targets": [f"127.0.0.1:{r.port}"], "labels": target(r)} for r in runners]
        if groups != self._last:
            tmp = self.targets_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(groups))
            tmp.replace(self.targets_path)  # atomic: Prometheus never reads half a file
            self._last = groups

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        return response.json()["data"]["result"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
