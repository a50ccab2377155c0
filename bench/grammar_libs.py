"""xgrammar against llguidance on this machine: grammar compile time (uncached and cached), per-token mask fill,
and how each takes the tokenizer. The figures that chose the engine's grammar library (engine/structured/).

Two tokenizers: the demo model's (512 tokens, byte-level BPE with special tokens) and one of real size
(byte-level BPE with 32,000 tokens trained here on the standard library's sources), since a mask fill scales
with the vocabulary. Each schema is compiled from a fresh compiler (uncached) and again (cached); a decode of a
valid document is replayed token by token through a matcher, timing the mask fill at every step.

    python bench/grammar_libs.py            # writes bench/results/grammar_libs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_kvpilot_importable, provenance, write_result

ensure_kvpilot_importable()

# Real shapes: a tool call's arguments, a nested extraction record, a pydantic model's schema with $defs and
# anyOf, and a long-keyed configuration object.
SCHEMAS: dict[str, dict[str, Any]] = {
    "weather_tool": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "city and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    "invoice": {
        "type": "object",
        "properties": {
            "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
            "issued": {"type": "string", "format": "date"},
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"},
                               "vip": {"type": "boolean"}},
                "required": ["name", "email", "vip"],
            },
            "lines": {
                "type": "array", "minItems": 1, "maxItems": 20,
                "items": {"type": "object",
                          "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                                         "unit_price": {"type": "number", "minimum": 0}},
                          "required": ["sku", "quantity", "unit_price"]},
            },
            "total": {"type": "number"},
        },
        "required": ["invoice_number", "issued", "customer", "lines", "total"],
    },
    "pydantic_event": {
        "$defs": {
            "Person": {"type": "object", "title": "Person",
                       "properties": {"name": {"type": "string"}, "age": {"anyOf": [{"type": "integer"},
                                                                                      {"type": "null"}]}},
                       "required": ["name", "age"]},
        },
        "title": "Event", "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 80},
            "attendees": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "maxItems": 5},
            "kind": {"anyOf": [{"const": "meeting"}, {"const": "call"}, {"type": "null"}]},
        },
        "required": ["title", "attendees", "kind"],
    },
    "long_keys": {
        "type": "object",
        "properties": {f"configuration_parameter_number_{i}_value": {"type": "integer"} for i in range(8)},
        "required": [f"configuration_parameter_number_{i}_value" for i in range(8)],
        "additionalProperties": False,
    },
}
DOCUMENTS = {
    "weather_tool": {"location": "Paris, France", "unit": "celsius", "days": 3},
    "invoice": {"invoice_number": "INV-20261", "issued": "2026-12-01",
                "customer": {"name": "Ada", "email": "ada@example.com", "vip": True},
                "lines": [{"sku": "A-1", "quantity": 2, "unit_price": 9.5}], "total": 19.0},
    "pydantic_event": {"title": "Standup", "attendees": [{"name": "Bo", "age": None}], "kind": "call"},
    "long_keys": {f"configuration_parameter_number_{i}_value": i for i in range(8)},
}


def big_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE of real size, trained on the standard library's sources (no network needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sources = sorted(Path(json.__file__).resolve().parents[1].glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((p.read_text(errors="ignore") for p in sources), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    with tempfile.TemporaryDirectory() as d:  # round-trip through save_pretrained, as a checkpoint ships it
        fast.save_pretrained(d)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(d)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def bench_xgrammar(tokenizer: Any, vocab: int, reps: int) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    out: dict[str, Any] = {"tokenizer_ms": _ms(t), "vocab_type": str(info.vocab_type), "schemas": {}}
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        uncached = []
        for _ in range(reps):
            compiler = xgr.GrammarCompiler(info, max_threads=2)
            t = time.perf_counter()
            compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
            uncached.append(_ms(t))
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        cached = _ms(t)
        ids = tokenizer(json.dumps(DOCUMENTS[name], separators=(",", ":")), add_special_tokens=False).input_ids
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab)
        fills, accepted = [], 0
        for tok in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            fills.append(_ms(t))
            if not matcher.accept_token(tok):
                break
            accepted += 1
        logits = torch.zeros(1, vocab)
        t = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, mask)
        out["schemas"][name] = {
            "compile_uncached_ms": statistics.median(uncached), "compile_cached_ms": cached,
            "mask_fill_ms_median": statistics.median(fills), "mask_fill_ms_max": max(fills),
            "apply_cpu_ms": _ms(t), "doc_tokens": len(ids), "doc_tokens_accepted": accepted,
        }
    return out


def bench_llguidance(tokenizer: Any, vocab: int, reps: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    out: dict[str, Any] = {"tokenizer_ms": _ms(t), "schemas": {}}
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        uncached = []
        for _ in range(reps):
            t = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False})
            matcher = llguidance.LLMatcher(lltok, grammar)
            first = llguidance.torch.allocate_token_bitmask(1, vocab)
            llguidance.torch.fill_next_token_bitmask(matcher, first, 0)  # its compile is lazy: the first mask
            uncached.append(_ms(t))
        ids = tokenizer(json.dumps(DOCUMENTS[name], separators=(",", ":")), add_special_tokens=False).input_ids
        matcher = llguidance.LLMatcher(lltok, grammar)
        mask = llguidance.torch.allocate_token_bitmask(1, vocab)
        fills, accepted = [], 0
        for tok in ids:
            t = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            fills.append(_ms(t))
            if not matcher.consume_token(tok):
                break
            accepted += 1
        logits = torch.zeros(1, vocab)
        t = time.perf_counter()
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)
        out["schemas"][name] = {
            "compile_uncached_ms": statistics.median(uncached), "compile_cached_ms": None,
            "mask_fill_ms_median": statistics.median(fills), "mask_fill_ms_max": max(fills),
            "apply_cpu_ms": _ms(t), "doc_tokens": len(ids), "doc_tokens_accepted": accepted,
            "error": matcher.get_error() or None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--big-vocab", type=int, default=32000)
    args = parser.parse_args()
    from kvpilot.engine.demo import ensure_demo_model
    from transformers import AutoTokenizer

    t = time.perf_counter()
    tokenizers = {"demo-512": AutoTokenizer.from_pretrained(ensure_demo_model())}
    tokenizers[f"bpe-{args.big_vocab}"] = big_tokenizer(args.big_vocab)
    print(f"tokenizers ready in {_ms(t) / 1000:.1f} s", flush=True)
    results: dict[str, Any] = {}
    for tname, tok in tokenizers.items():
        vocab = len(tok)
        results[tname] = {"vocab": vocab, "xgrammar": bench_xgrammar(tok, vocab, args.reps),
                          "llguidance": bench_llguidance(tok, vocab, args.reps)}
        for lib in ("xgrammar", "llguidance"):
            r = results[tname][lib]
            print(f"{tname} {lib}: tokenizer {r['tokenizer_ms']:.0f} ms")
            for name, s in r["schemas"].items():
                cached = f"{s['compile_cached_ms']:.3f}" if s["compile_cached_ms"] is not None else "-"
                print(f"  {name:15s} compile {s['compile_uncached_ms']:8.2f} ms (cached {cached}) "
                      f"fill p50 {s['mask_fill_ms_median']:.4f} max {s['mask_fill_ms_max']:.3f} ms "
                      f"accepted {s['doc_tokens_accepted']}/{s['doc_tokens']}")
    from importlib.metadata import version

    write_result("grammar_libs", {
        **provenance(), "reps": args.reps, "libraries": {"xgrammar": version("xgrammar"),
                                                         "llguidance": version("llguidance")},
        "results": results,
    })


if __name__ == "__main__":
    main()
