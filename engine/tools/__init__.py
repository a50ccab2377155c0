"""Tool calling: the formats models write calls in, and reading calls out of their text.

formats.py names each format (Hermes-style `<tool_call>` tags as Qwen writes them, Llama 3.1's bare JSON),
detects a model's from its chat template, and builds the structural tag that makes `tool_choice` "required"
or a named function a grammar on the ordinary constrained-decoding path. parser.py reads calls out of the
text incrementally, so a stream and a whole response are one parse.
"""
