"""What a request constrains its output to, under vLLM's names (`SamplingParams(structured_outputs=...)`).

Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object` or `structural_tag` is set. JSON is generated
in the compact one-line form `json.dumps` writes (", " and ": "), never with free whitespace, inside a structural
tag too: a model then cannot loop on whitespace, and jump-forward can append the schema's fixed keys and
punctuation without a decoding step.
"""

from __future__ import annotations

import json as jsonlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
MAX_STRUCTURAL_TAG_CHARS = 1024 * 1024  # tool calling puts every tool's parameter schema in one tag

Kind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams, bounded. `json` is a JSON schema (an object, or its JSON text)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS,
                                description="EBNF (GBNF, with ::=) or Lark")
    json_object: bool | None = None
    structural_tag: str | None = Field(
        default=None, min_length=1, max_length=MAX_STRUCTURAL_TAG_CHARS,
        description="xgrammar's structural tag, as JSON text: tags, triggers and their contents (tool calls)")
    disable_any_whitespace: bool = Field(default=False, description="accepted: JSON here never has free whitespace")
    disable_additional_properties: bool = Field(
        default=False, description="treat every object in the schema as additionalProperties: false")
    disable_fallback: bool = Field(default=False, description="accepted: there is one grammar backend, no fallback")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        set_ = [k for k in ("json_schema", "regex", "choice", "grammar", "structural_tag")
                if getattr(self, k) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            names = ", ".join("json" if k == "json_schema" else k for k in set_) or "none"
            raise ValueError(f"set exactly one of json, regex, choice, grammar, json_object, structural_tag "
                             f"(got {names})")
        if isinstance(self.json_schema, str) and len(self.json_schema) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the JSON schema exceeds {MAX_GRAMMAR_CHARS} characters")
        return self

    @property
    def kind(self) -> Kind:
        if self.json_schema is not None:
            return "json"
        if self.regex is not None:
            return "regex"
        if self.choice is not None:
            return "choice"
        if self.grammar is not None:
            return "grammar"
        if self.structural_tag is not None:
            return "structural_tag"
        return "json_object"

    def source(self) -> str:
        """The grammar's text, as compiled (a schema as JSON text, choices as a JSON list): with `kind`, the
        cache key. Property order is kept: it is the order a schema's keys are generated in."""
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                schema = jsonlib.loads(schema)  # validate.py reports a parse error before this runs
            if self.disable_additional_properties:
                schema = _closed(schema)
            return jsonlib.dumps(schema, ensure_ascii=False)
        if self.choice is not None:
            return jsonlib.dumps(self.choice, ensure_ascii=False)
        return self.regex or self.grammar or self.structural_tag or '{"type": "object"}'

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.source())


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed(schema: Any) -> Any:
    """The schema with additionalProperties false on every object schema that does not say otherwise."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "examples", "required"):
            out[key] = value
        else:
            out[key] = _closed(value)
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
