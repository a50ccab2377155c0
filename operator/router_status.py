"""The routers' part of status: how many are ready, what the stable Service selects, what they tokenize with.

While no router is ready the stable Service selects the active revision's engines directly (router_resources.py),
so a router that cannot start, or an operator upgrade that adds routers to a serving InferenceService, never
takes the endpoint away: that is Degraded (no prefix routing, no queue, no scale from zero), not down.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator.reducer import Part
from kvpilot.operator.status import RouterStatus


def ready_routers(deployment: dict[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)


def router_part(deployment: dict[str, Any] | None, active: str | None, tokenizer: str | None) -> Part:
    part = Part()
    want = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
    ready = ready_routers(deployment)
    direct = ready == 0 and active is not None
    part.fields["router"] = RouterStatus(replicas=want, ready_replicas=ready, tokenizer=tokenizer,
                                         stable_selects="engines" if direct else "routers")
    if ready:
        part.condition("RouterReady", True, "Routing", f"{ready}/{want} routers ready"
                       + ("" if tokenizer else "; no tokenizer: text prompts route by their leading characters"))
    elif direct:
        part.condition("RouterReady", False, "RoutersUnavailable", f"no router of {want} is ready: the stable "
                       f"Service selects revision {active}'s engines directly (no prefix routing, no queue)")
        part.phase = "Degraded"
    else:
        part.condition("RouterReady", False, "Deploying", f"waiting for the routers (0/{want} ready)")
        part.phase = "Deploying"
    return part
