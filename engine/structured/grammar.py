"""A request's constraint as an xgrammar Grammar: the one construction both sides use.

The front builds it at submission to refuse a bad schema, regex or grammar with a 400 (no tokenizer is
needed, about a millisecond); the engine core builds it again and compiles it for its tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.structured.params import StructuredOutputs

# xgrammar prefixes its messages with "[hh:mm:ss] /path/file.cc:NN: ".
_LOCATION = re.compile(r"^\[[0-9:]+\] [^ ]+:\d+: ")
_WHAT = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
         "grammar": "grammar", "structural_tag": "structural tag"}


def ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal (xgrammar's GBNF escapes)."""
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_LITERAL_KEYS = ("enum", "const", "default", "examples")


def bounded_strings(schema: Any) -> Any:
    """Strings with a length bound and no pattern, rewritten as the equivalent pattern.

    xgrammar 0.2.9 compiles minLength/maxLength to a rule that admits raw control characters, which makes
    invalid JSON; its pattern rule escapes correctly. Characters are counted alike in both.
    """
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _LITERAL_KEYS else bounded_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{"" if high is None else int(high)}}}$'
    return out


def json_schema_grammar(schema: Any) -> Any:
    """The compact-JSON Grammar of a schema (a dict, or True for any JSON value)."""
    import xgrammar as xgr

    text = json.dumps(bounded_strings({} if schema is True else schema), ensure_ascii=False)
    return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)


def _compact_json(node: Any) -> Any:
    """A structural tag with each plain JSON-schema content as the grammar `json_schema_grammar` builds: the
    same compact JSON, string escaping and strictness as a `json` constraint (xgrammar's own json_schema
    content allows free whitespace). Contents with another style, any_order or excludes are left as given."""
    if isinstance(node, list):
        return [_compact_json(n) for n in node]
    if not isinstance(node, dict):
        return node
    plain = node.get("style", "json") == "json" and not node.get("any_order") and not node.get("excludes")
    if node.get("type") == "json_schema" and plain and "json_schema" in node:
        return {"type": "grammar", "grammar": str(json_schema_grammar(node["json_schema"]))}
    return {k: _compact_json(v) for k, v in node.items()}


def _current_form(tag: Any) -> Any:
    """vLLM's first structural-tag form ({"structures": [{begin, schema, end}], "triggers"}) as xgrammar's
    current one: text until a trigger, then the tag it opens."""
    if not isinstance(tag, dict) or "structures" not in tag:
        return tag
    structures = tag["structures"]
    if not isinstance(structures, list) or not all(isinstance(s, dict) and {"begin", "schema", "end"} <= s.keys()
                                                   for s in structures):
        raise ValueError("structures must be a list of {begin, schema, end}")
    tags = [{"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s["schema"]},
             "end": s["end"]} for s in tag["structures"]]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []),
                                                 "tags": tags}}


def build(spec: StructuredOutputs) -> Any:
    """The xgrammar Grammar of `spec`; ValueError naming the problem if it has none."""
    import xgrammar as xgr

    kind = spec.kind
    try:
        source = spec.source()
        if kind in ("json", "json_object"):
            return json_schema_grammar(json.loads(source))
        if kind == "structural_tag":
            tag = _compact_json(_current_form(json.loads(source)))
            return xgr.Grammar.from_structural_tag(json.dumps(tag))
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(ebnf_literal(c) for c in spec.choice or []))
        if "::=" in source:
            return xgr.Grammar.from_ebnf(source)
        return xgr.Grammar.from_lark(source)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar raises RuntimeError for a bad input
        message = _LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise ValueError(f"invalid {_WHAT[kind]}: {message}") from exc


def check(spec: StructuredOutputs, param: str) -> None:
    """Refuse at submission what can never compile (a RequestRejected, so a 400 naming `param`)."""
    try:
        build(spec)
    except ValueError as exc:
        raise RequestRejected(str(exc), param=param) from exc
