"""The test API server's handling of the InferenceService CRD on the wire, over kmock (e2e/crdserver.py has the
rules): structural-schema admission of writes, Tables for `kubectl get` (lists, single objects, watch
events), list kinds, watches that honour label and field selectors, and discovery without subresource
short names. A mixin of ApiServer (e2e/apiserver.py)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums
from kmock._internal.dicts import merge_patch_dict
from kvpilot.operator.spec import GROUP, PLURAL

from e2e import crdserver, ssa


def selector_matches(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    return selector.items() <= (labels or {}).items()


def _parse_selector(text: str) -> dict[str, str]:
    """Equality selectors only (`a=b,c=d`): all the operator and the harness use."""
    pairs = [term.partition("=") for term in filter(None, text.split(","))]
    if any(not sep or key.endswith("!") for key, sep, _ in pairs):
        raise ValueError(f"unsupported label selector {text!r}: only equality terms")
    return {key: value.removeprefix("=") for key, _, value in pairs}


class CustomResourceHandling:
    """Needs `_live(plural, namespace, name)` and `validation` from the class it is mixed into."""

    validation: bool

    def _live(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _admitted(self, request: kmock.Request) -> bool:
        """Writes to an InferenceService's main resource go through the CRD's structural schema."""
        writes = request.action in (enums.action.CREATE, enums.action.UPDATE)
        return self.validation and _is_custom(request) and writes and request.subresource is None

    def _admit(self, request: kmock.Request, warnings: list[str]) -> aiohttp.web.StreamResponse | kmock.Request:
        """Defaults, pruning of unknown fields (400 with fieldValidation=Strict, else a Warning each) and schema
        validation (422 with one cause per field) on the object as the write would leave it (e2e/crdserver.py)."""
        assert request.resource is not None
        current = None if request.action == enums.action.CREATE else self._live(
            request.resource.plural, request.namespace or "", request.name or "")
        final = json.loads(json.dumps(merge_patch_dict(current or {}, request.data)))
        crdserver.apply_defaults(final, crdserver.schema())
        unknown = crdserver.prune(final, crdserver.schema())
        if unknown and request.params.get("fieldValidation") == "Strict":
            return aiohttp.web.json_response(crdserver.strict_status(unknown), status=400)
        warnings += [f'unknown field "{u}"' for u in unknown]
        causes = crdserver.invalid(final)
        if causes:
            name = (final.get("metadata") or {}).get("name") or request.name or ""
            return aiohttp.web.json_response(crdserver.invalid_status(name, causes), status=422)
        return attrs.evolve(request, data=final if current is None else ssa.merge_diff(current, final))

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        text = request.params.get("labelSelector")
        if text:
            selector = _parse_selector(text)
            payload["items"] = [
                i for i in payload["items"] if selector_matches(selector, (i.get("metadata") or {}).get("labels"))
            ]
        fields = request.params.get("fieldSelector")
        if fields:
            payload["items"] = [i for i in payload["items"] if crdserver.field_selector_matches(fields, i)]
        if _is_custom(request) and crdserver.wants_table(request.headers.get("Accept", "")):
            return crdserver.table(payload["items"])
        info = self.resources.get(request.resource) if request.resource is not None else None
        if info is not None and info.kind:  # what kubectl decodes a list by
            group = request.resource.group  # type: ignore[union-attr]
            payload.update(kind=f"{info.kind}List", apiVersion=f"{group}/{request.resource.version}".lstrip("/"))  # type: ignore[union-attr]
        return payload

    def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        """kmock's stream, typed as a watch is (`application/json;stream=watch`: kubectl rejects octet-stream),
        each object a one-row Table when the client asks for Tables (`kubectl get --watch`)."""
        stream = _selected(super()._serve_watch(request), request.params.get("labelSelector"),
                           request.params.get("fieldSelector"))
        if _is_custom(request) and crdserver.wants_table(request.headers.get("Accept", "")):
            stream = _as_tables(stream)
        return kmock.Response(headers={"Content-Type": "application/json;stream=watch"}, payload=stream)

    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock lists subresources with their resource's short names and categories; a real server does not."""
        payload = await super()._serve_version(request)
        for resource in payload.get("resources", []):
            if "/" in resource["name"]:
                resource.update(shortNames=[], categories=[])
        return payload

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = await super()._serve_fetch(request)
        if _is_custom(request) and crdserver.wants_table(request.headers.get("Accept", "")):
            return crdserver.table([obj])
        return obj


async def _selected(stream: Any, labels: str | None, fields: str | None) -> Any:
    """Only the events of objects the watch's label and field selectors match (kmock streams every object)."""
    selector = _parse_selector(labels) if labels else {}
    async for event in stream:
        obj = event.get("object") if isinstance(event, dict) else None
        if isinstance(obj, dict) and not (
            selector_matches(selector, (obj.get("metadata") or {}).get("labels"))
            and (not fields or crdserver.field_selector_matches(fields, obj))
        ):
            continue
        yield event


async def _as_tables(stream: Any) -> Any:
    async for event in stream:
        if isinstance(event, dict) and isinstance(event.get("object"), dict):
            event = {**event, "object": crdserver.table([event["object"]])}
        yield event


def _is_custom(request: kmock.Request) -> bool:
    return request.resource is not None and (request.resource.group, request.resource.plural) == (GROUP, PLURAL)


