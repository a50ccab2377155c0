"""Least privilege, measured: the verbs the chart's RBAC grants the operator against the API calls the operator
made during the run (counted by the test API server, by user agent: kopf's and the operator's client's), and the
verbs the routers' Role grants against the calls the routers made (user agent `kvpilot-router`).

A verb used but not granted would be a 403 in a cluster; a verb granted but never used is privilege to remove.
The only grants the run cannot exercise are listed in UNEXERCISED, with the reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import helm_python
import yaml
from kvpilot.operator.kube import USER_AGENT
from kvpilot.operator.router_resources import router_rbac
from kvpilot.router.kube_source import USER_AGENT as ROUTER_AGENT

from e2e.report import Result

CHART = Path(__file__).resolve().parents[1] / "charts" / "kvpilot"
OPERATOR_AGENTS = {"kopf", USER_AGENT}
UNEXERCISED = {
    ("monitoring.coreos.com", "servicemonitors"): "the local cluster has no Prometheus operator (no ServiceMonitor "
                                                  "CRD), so no ServiceMonitor is written or watched",
}


def granted(values: dict[str, Any] | None = None) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule in the chart's ClusterRoles, rendered with `values`."""
    rendered = helm_python.Chart.load(str(CHART)).render(values or {}, name="kvpilot", namespace="kvpilot-system")
    out = set()
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "ClusterRole":
                for rule in doc["rules"]:
                    out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def used(calls: Counter[tuple[str, str, str, str]], agents: set[str] = OPERATOR_AGENTS) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for (agent, group, resource, verb) in calls if agent in agents}


def router_granted() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of the Role the operator gives every InferenceService's routers."""
    role = next(doc for doc in router_rbac("any", "any") if doc["kind"] == "Role")
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def rbac_result(calls: Counter[tuple[str, str, str, str]]) -> Result:
    result = Result("RBAC: verbs granted == API calls made, the operator's and the routers'", False)
    grants, made = granted(), used(calls)
    missing = sorted(made - grants)
    unused = sorted(g for g in grants - made if (g[0], g[1]) not in UNEXERCISED)
    router_grants, router_made = router_granted(), used(calls, {ROUTER_AGENT})
    router_off = sorted(router_made ^ router_grants)
    result.passed = not missing and not unused and bool(router_made) and not router_off
    result.note = (f"operator: {len(made)} (group, resource, verb) used, {len(grants)} granted; used but not granted: "
                   f"{missing or 'none'}; granted but unused: {unused or 'none'}; not exercisable here: "
                   f"{sorted(f'{g}/{r}' for g, r in UNEXERCISED)}; routers: {sorted(router_made)} used, "
                   f"{len(router_grants)} granted, differing: {router_off or 'none'}")
    return result
