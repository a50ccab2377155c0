"""A real Prometheus scrapes the server and answers a TTFT quantile after load."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from kvpilot.engine.server.loadgen import BenchConfig, run_benchmark
from kvpilot.engine.server.workloads import RandomWorkload

from tests.server.conftest import RunningServer, dashboard_exprs, free_port

pytestmark = pytest.mark.slow  # a real Prometheus scraping a real server

QUERY = "histogram_quantile(0.95, sum by (le) (rate(kvpilot:time_to_first_token_seconds_bucket[1m])))"


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install -y prometheus)")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: kvpilot\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)
        while not _scraping(url):  # target discovery lags start-up by a few seconds
            assert time.monotonic() < deadline + 15, "prometheus never scraped the server"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _scraping(url: str) -> bool:
    targets = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
    return bool(targets) and targets[0]["health"] == "up"


def _query(url: str) -> list[dict[str, object]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": QUERY}).json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def test_prometheus_answers_ttft_p95(server: RunningServer, prometheus: str) -> None:
    workload = RandomWorkload(num_prompts=60, min_input_len=8, max_input_len=32, min_output_len=4,
                              max_output_len=8, seed=3)
    bench = asyncio.create_task(run_benchmark(BenchConfig(url=server.url, workload=workload, request_rate=15,
                                                          max_concurrency=8, progress=False)))
    value = None
    deadline = time.monotonic() + 40
    while value is None and time.monotonic() < deadline:
        await asyncio.sleep(1)
        result = await asyncio.to_thread(_query, prometheus)
        if result and result[0]["value"][1] not in ("NaN", "+Inf"):  # type: ignore[index]
            value = float(result[0]["value"][1])  # type: ignore[index]
    outcome = await bench
    assert outcome.completed == 60 and outcome.failed == 0
    assert value is not None and 0 < value < 10, "no TTFT p95 from Prometheus"


def test_dashboard_queries_are_valid_promql(prometheus: str) -> None:
    for expr in dashboard_exprs():
        query = expr.replace("$__rate_interval", "1m").replace("$model_name", ".*").replace("$revision", ".*")
        body = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}).json()
        assert body["status"] == "success", (expr, body)
