"""A real Prometheus (Debian's `prometheus`) scraping every pod the node runs, through file_sd.

The node rewrites the target file as pods come and go; each target carries what a Kubernetes scrape
configuration takes from the pod's metadata (operator/resources.py SERIES_LABELS): its namespace, its
InferenceService and its revision, and its name. `honor_labels: false`, so a pod cannot claim another
tenant's labels: a label it reports itself under one of those names is kept as `exported_<name>`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import yaml
from kvpilot.operator.resources import LABEL_ISVC, LABEL_REVISION
from kvpilot.tuner.prometheus import PrometheusProcess

from e2e.pod import PodRunner

SCRAPE_INTERVAL_S = 1.0
SCRAPE_INTERVAL = f"{SCRAPE_INTERVAL_S:g}s"


class Prometheus:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.targets_path = workdir / "targets.json"
        self.process: PrometheusProcess | None = None
        self._last: list[dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        assert self.process is not None, "start() first"
        return self.process.url

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
        try:
            self.process = PrometheusProcess(config_path, self.workdir / "tsdb", self.workdir / "prometheus.log")
        except FileNotFoundError as exc:
            raise RuntimeError(f"{exc}: the e2e run needs a real Prometheus") from None
        await asyncio.to_thread(self.process.wait_ready, 20.0)

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
        if self.process is not None:
            self.process.stop()
