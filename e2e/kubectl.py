"""The loop as a user drives it: only `kubectl` (v1.32 on the machine image; Debian's kubernetes-client else).

apply -> `kubectl wait --for=condition=Ready` -> `kubectl get kvis` shows the printer columns -> apply a new
model revision -> watch the rollout with `kubectl get kvis --watch` -> `kubectl describe` shows the Events; and
a manifest that breaks the schema is refused by `kubectl apply` with a message naming the field. Its own
InferenceService, deleted at the end with `kubectl delete`.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import Cluster
from e2e.report import Result

NAME = "kubectl-demo"
COLUMNS = ["NAME", "MODEL", "REVISION", "PHASE", "TTFT P95", "TOK/S", "AGE"]


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        binary = shutil.which("kubectl")
        if binary is None:
            raise RuntimeError("no kubectl on PATH (Debian: apt-get install kubernetes-client)")
        # HOME: kubectl keeps its discovery cache there; the work directory's, not the repository's.
        self.binary = binary
        self.env = {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(kubeconfig.parent)}

    async def run(self, *args: str, timeout_s: float = 60) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(self.binary, *args, env=self.env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"kubectl {' '.join(args)}: no answer in {timeout_s:.0f} s") from None
        return proc.returncode or 0, out.decode(), err.decode()

    async def ok(self, *args: str, timeout_s: float = 60) -> str:
        code, out, err = await self.run(*args, timeout_s=timeout_s)
        if code != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {code}: {err.strip() or out.strip()}")
        return out

    async def watch_until(self, predicate: Any, timeout_s: float, *args: str) -> list[str]:
        """`kubectl <args> --watch`, line by line, until `predicate(line)`; returns the lines seen."""
        proc = await asyncio.create_subprocess_exec(self.binary, *args, "--watch", env=self.env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                while not lines or not predicate(lines[-1]):
                    line = await proc.stdout.readline()
                    if not line:
                        raise AssertionError(f"kubectl --watch ended: {(await proc.stderr.read()).decode()}")  # type: ignore[union-attr]
                    lines.append(line.decode().rstrip())
        except TimeoutError:
            raise AssertionError(f"kubectl {' '.join(args)} --watch: no match in {timeout_s:.0f} s: {lines}") from None
        finally:
            proc.kill()
            await proc.wait()
        return lines


async def kubectl_scenario(cluster: Cluster, spec: dict[str, Any], ready_timeout_s: float) -> Result:
    result = Result("kubectl: apply, wait, get, upgrade, watch, describe, invalid apply refused", False)
    kubectl = Kubectl(cluster.kubeconfig)
    manifest = {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": NAME},
                "spec": copy.deepcopy(spec)}
    path = cluster.workdir / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    started = time.monotonic()
    created = await kubectl.ok("apply", "-f", str(path))
    await kubectl.ok("wait", f"kvis/{NAME}", "--for=condition=Ready", f"--timeout={int(ready_timeout_s)}s",
                     timeout_s=ready_timeout_s + 10)
    result.to_ready_s = time.monotonic() - started
    header, row = (await kubectl.ok("get", "kvis", NAME)).splitlines()[:2]
    old = row.split()[2]
    columns_shown = [c for c in COLUMNS if c in header] == COLUMNS and row.split()[:2] == [NAME, spec["model"]["name"]]

    manifest["spec"]["model"]["revision"] = "r2"
    path.write_text(yaml.safe_dump(manifest))
    mark = time.monotonic()
    configured = await kubectl.ok("apply", "-f", str(path))
    def switched(line: str) -> bool:  # NAME MODEL REVISION PHASE ...: a new revision, and Ready
        cells = line.split()
        return len(cells) > 3 and cells[2] != old and cells[3] == "Ready"

    seen = await kubectl.watch_until(switched, 120, "get", "kvis", NAME, "--no-headers")
    result.to_switch_s = time.monotonic() - mark
    described = await kubectl.ok("describe", "kvis", NAME)
    events = [r for r in ("RolloutStarted", "CandidateReady", "SmokeTestPassed", "Promoted") if r in described]

    bad = copy.deepcopy(manifest)
    bad["metadata"]["name"] = f"{NAME}-bad"
    bad["spec"]["engine"]["gpuMemoryUtilization"] = 1.5
    bad_path = cluster.workdir / f"{NAME}-bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    code, _, refusal = await kubectl.run("apply", "-f", str(bad_path))
    refused = code != 0 and "spec.engine.gpuMemoryUtilization" in refusal
    await kubectl.ok("delete", "kvis", NAME, "--wait=true", timeout_s=120)

    result.passed = (f"{NAME} created" in created and f"{NAME} configured" in configured and columns_shown
                     and len(events) == 4 and refused)
    result.note = (f"columns {header.split()}; {old} -> {seen[-1].split()[2]} ({len(seen)} watch lines); "
                   f"describe shows {events}; bad manifest refused: {refusal.strip().splitlines()[-1][:160]}")
    return result
