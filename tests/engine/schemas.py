"""Random JSON schemas for constrained-decoding tests: nested objects, arrays with item bounds, enums, anyOf,
string patterns and lengths, integer and number bounds, optional properties. Seeded, so a failure reproduces."""

from __future__ import annotations

import random
from typing import Any

PATTERNS = ["^[a-z]{2,6}$", "^[A-Z][0-9]{3}$", "^(red|green|blue)-[0-9]+$", "^[a-f0-9]{4}$",
            "^\\w{1,8}@[a-z]{1,8}\\.com$"]
WORDS = ["alpha", "beta", "gamma", "delta", "with space", "quo\"te", "ünï", "x"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum", "null"]
    if depth < 3:
        kinds += ["object", "object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.5:
            schema["minLength"] = rng.randint(0, 3)
            schema["maxLength"] = schema["minLength"] + rng.randint(0, 12)
        return schema
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind == "number":
        lo = round(rng.uniform(-100, 100), 2)
        return {"type": "number", "minimum": lo, "maximum": lo + round(rng.uniform(0.5, 100), 2)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4)) + ([rng.randint(0, 9)] if rng.random() < 0.3 else [])}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 3)}
    names = rng.sample(["id", "name", "count", "value", "items", "meta", "kind", "score", "tags", "flag"],
                       rng.randint(1, 4))
    props = {name: random_schema(rng, depth + 1) for name in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_object_schema(seed: int) -> dict[str, Any]:
    """A schema whose root is an object (what response_format's json_schema takes)."""
    rng = random.Random(seed)
    while True:
        schema = random_schema(rng)
        if schema.get("type") == "object":
            return schema


def closing_bias(tokenizer: Any, bias: float = 8.0) -> dict[int, float]:
    """logit_bias toward tokens holding a quote. Random weights never learned to end a string, so without it
    an unbounded string runs for hundreds of tokens; the grammar, not the bias, is what keeps output valid."""
    return {i: bias for i in range(len(tokenizer)) if '"' in tokenizer.decode([i])}
