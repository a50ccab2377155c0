"""Constrained decoding: grammars (JSON schema, regex, choice, EBNF/Lark) that decide which tokens may come next.

params.py is the request's shape (vLLM's `structured_outputs`), validate.py checks it at submission without
a tokenizer, compiler.py compiles it for the tokenizer in the engine core (off the step loop, cached by
content), and matchers.py keeps each constrained sample's grammar state: the token bitmask of a step,
accepted tokens, and the forced continuations jump-forward appends.
"""
