"""Server-side apply and field ownership, as the API server does them, over plain dicts (no I/O).

Per https://kubernetes.io/docs/reference/using-api/server-side-apply/: every write records which manager
owns which fields (`metadata.managedFields`, fieldsV1). An apply (`PATCH`, `application/apply-patch+yaml`,
`fieldManager` required) sets the fields of its configuration and becomes their owner; a field it owned
and no longer sends is removed unless another manager owns it too; setting a field that another
manager owns to a different value is a conflict (409, one cause per field) unless `force=true`, which
takes the field over. Applying the value another manager already set shares the field. Any other write
(create, update, merge patch) makes its manager the owner of the fields it changed and takes them from
everyone else.

The emulation's simplifications: a list is associative (merged item by item) when every item is a map
with a `name`, keyed by it; every other list is atomic (owned and replaced whole). The API server uses
each field's schema for this instead; for the manifests the operator writes the two agree. Of
`metadata`, only labels, annotations, ownerReferences and finalizers are owned, as on a real server.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

Path = tuple[tuple[str, str], ...]  # ("f", map key) or ("k", list item key as JSON)
OWNED_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")
_MISSING = object()


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, str]]) -> None:
        self.conflicts = conflicts  # (manager, field path as `.spec.x`)
        fields = ", ".join(f"conflict with {m!r}: {p}" for m, p in conflicts)
        super().__init__(f"Apply failed with {len(conflicts)} conflict{'s' * (len(conflicts) > 1)}: {fields}")


def _associative(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)


def _item_key(item: dict[str, Any]) -> str:
    return json.dumps({"name": item["name"]}, separators=(",", ":"))


def leaves(obj: Any, prefix: Path = ()) -> set[Path]:
    """The paths of every value `obj` sets: map keys down to scalars and atomic lists."""
    if isinstance(obj, dict) and obj:
        out: set[Path] = set()
        for key, value in obj.items():
            out |= leaves(value, (*prefix, ("f", key)))
        return out
    if isinstance(obj, list) and _associative(obj):
        out = set()
        for item in obj:
            body = {k: v for k, v in item.items() if k != "name"}
            key = (*prefix, ("k", _item_key(item)))
            out |= leaves(body, key) if body else {key}
        return out
    return {prefix}


def object_fields(obj: dict[str, Any], subresource: str | None) -> set[Path]:
    """The fields a write of `obj` to the object (or its status) can own."""
    if subresource == "status":
        return leaves(obj.get("status") or {}, (("f", "status"),)) if obj.get("status") else set()
    out: set[Path] = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata":
            for meta_key in OWNED_METADATA:
                if (value or {}).get(meta_key) is not None:
                    out |= leaves(value[meta_key], (("f", "metadata"), ("f", meta_key)))
        else:
            out |= leaves(value, (("f", key),))
    return out


def value_at(obj: Any, path: Path) -> Any:
    """The value at `path`; a list item named by the last element is present (True) or _MISSING."""
    for kind, key in path:
        if kind == "f":
            obj = obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING
        else:
            name = json.loads(key)["name"]
            items = obj if isinstance(obj, list) else []
            obj = next((i for i in items if isinstance(i, dict) and i.get("name") == name), _MISSING)
        if obj is _MISSING:
            return _MISSING
    return True if path and path[-1][0] == "k" else obj


def dotted(path: Path) -> str:
    return "".join(f".{key}" if kind == "f" else f"[{key}]" for kind, key in path)


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for kind, key in path:
            node = node.setdefault(f"{kind}:{key}", {})
    return root


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, sub in tree.items():
        if key == ".":
            continue
        kind, _, name = key.partition(":")
        path = (*prefix, (kind, name))
        out |= from_fields_v1(sub, path) if sub else {path}
    return out


def _merge(current: Any, applied: Any) -> Any:
    if isinstance(current, dict) and isinstance(applied, dict):
        merged = dict(current)
        for key, value in applied.items():
            merged[key] = _merge(current.get(key, _MISSING), value)
        return merged
    if isinstance(current, list) and isinstance(applied, list) and _associative(applied) and _associative(current):
        by_name = {i["name"]: i for i in current}
        merged_items = [_merge(by_name.get(i["name"], _MISSING), i) for i in applied]
        names = {i["name"] for i in applied}
        return merged_items + [i for i in current if i["name"] not in names]
    return applied


def _remove(obj: dict[str, Any], path: Path) -> None:
    """Delete the value at `path`, then the maps and list items (only `name` left) it leaves empty above it."""
    trail: list[tuple[Any, Any]] = []  # (container, key or index) down to the value
    node: Any = obj
    for kind, key in path:
        if kind == "f":
            if not isinstance(node, dict) or key not in node:
                return
            trail.append((node, key))
            node = node[key]
        else:
            name = json.loads(key)["name"]
            items = node if isinstance(node, list) else []
            index = next((i for i, item in enumerate(items) if item.get("name") == name), None)
            if index is None:
                return
            trail.append((node, index))
            node = node[index]
    while trail:
        container, key = trail.pop()
        del container[key]
        empty = container == {} or (isinstance(container, dict) and set(container) == {"name"})
        if not empty or not trail:
            return


def _entries(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list((obj.get("metadata") or {}).get("managedFields") or [])


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry(manager: str, operation: str, api_version: str, subresource: str | None, paths: set[Path]
           ) -> dict[str, Any]:
    entry = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": _timestamp(),
             "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(paths)}
    if subresource:
        entry["subresource"] = subresource
    return entry


def _same_slot(entry: dict[str, Any], manager: str, operation: str, subresource: str | None) -> bool:
    return (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (manager, operation, subresource)


def record_write(current: dict[str, Any] | None, new: dict[str, Any], manager: str, subresource: str | None
                 ) -> list[dict[str, Any]]:
    """managedFields after a non-apply write turned `current` into `new`: its manager owns what it changed."""
    before, after = object_fields(current or {}, subresource), object_fields(new, subresource)
    changed = {p for p in after if current is None or value_at(current, p) != value_at(new, p)}
    gone = before - after
    entries, mine = [], set(changed)
    for entry in _entries(current or {}):
        if (entry.get("subresource") == "status") != (subresource == "status"):
            entries.append(entry)
            continue
        owned = from_fields_v1(entry.get("fieldsV1") or {}) - changed - gone
        if _same_slot(entry, manager, "Update", subresource):
            mine |= owned
        elif owned:
            entries.append({**entry, "fieldsV1": to_fields_v1(owned)})
    if mine:
        entries.append(_entry(manager, "Update", new.get("apiVersion", ""), subresource, mine))
    return entries


def apply(current: dict[str, Any] | None, config: dict[str, Any], manager: str, force: bool,
          subresource: str | None) -> dict[str, Any]:
    """The object after `manager` applies `config` (raises ApplyConflict); its managedFields included."""
    current = current or {}
    if subresource == "status":
        config = {"status": config.get("status") or {}}
    else:
        config = {k: v for k, v in config.items() if k != "status"}
    applied = object_fields(config, subresource)
    conflicts, entries, previously_mine = [], [], set()
    for entry in _entries(current):
        if (entry.get("subresource") == "status") != (subresource == "status"):
            entries.append(entry)
            continue
        owned = from_fields_v1(entry.get("fieldsV1") or {})
        if _same_slot(entry, manager, "Apply", subresource):
            previously_mine = owned
            continue
        contested = {p for p in owned & applied if value_at(current, p) != value_at(config, p)}
        conflicts += [(entry["manager"], dotted(p)) for p in sorted(contested)]
        if owned - contested:
            entries.append({**entry, "fieldsV1": to_fields_v1(owned - contested)})
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    new = _merge(current, config)
    still_owned = set().union(*(from_fields_v1(e.get("fieldsV1") or {}) for e in entries)) if entries else set()
    for path in sorted(previously_mine - applied - still_owned, key=len, reverse=True):
        _remove(new, path)
    entries.append(_entry(manager, "Apply", config.get("apiVersion") or current.get("apiVersion", ""), subresource,
                          applied))
    new.setdefault("metadata", {})["managedFields"] = entries
    return new


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns `old` into `new` (None deletes a key; lists are replaced whole)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            both_maps = isinstance(value, dict) and isinstance(old[key], dict)
            patch[key] = merge_diff(old[key], value) if both_maps else value
    return patch
