"""The tool-call formats models are trained to write, and the grammar that holds a model to one.

A format is chosen per model by `EngineConfig.tool_call_parser` (vLLM's `--tool-call-parser` names); `auto`
reads it from the chat template, which is where a model's format is written down: Qwen's and Hermes's
templates show `<tool_call>` tags, Llama 3.1's asks for `{"name": ..., "parameters": ...}` (and knows
`<|python_tag|>`). A template that shows neither gets no format, and tool requests to it a clear 400.

`required` and named-function calls are constrained in the model's own format (as SGLang does, where vLLM
switches to a JSON array): a multi-turn conversation then feeds back exactly what the model wrote, and the
same parser reads constrained and free output. The arguments are each function's `parameters` schema,
compiled like any JSON constraint (compact, strict), so they always parse and validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

ParserName = Literal["hermes", "llama3_json"]
JSON_WS = "[ \t\n\r]*"  # whitespace as JSON defines it


@dataclass(frozen=True)
class ToolFormat:
    name: ParserName
    start_marker: str | None  # the tag that opens a call amid text; None: the calls are the whole message
    arguments_key: str  # the key the format's calls carry arguments under (both keys are read)
    end: str  # what closes a call after its arguments, as the format writes it
    tail: str  # the same, as a regex that also reads what models write instead (spacing)
    separator: str  # between parallel calls

    def begin(self, name: str) -> str:
        """Everything of a call before its arguments object."""
        marker = self.start_marker + "\n" if self.start_marker else ""
        return f'{marker}{{"name": "{name}", "{self.arguments_key}": '

    def call_text(self, name: str, arguments: str) -> str:
        """A whole call as the format writes it (and the chat template renders it back)."""
        return self.begin(name) + arguments + self.end


HERMES = ToolFormat("hermes", "<tool_call>", "arguments", "}\n</tool_call>",
                    JSON_WS + r"\}" + JSON_WS + "</tool_call>", "\n")
LLAMA3_JSON = ToolFormat("llama3_json", None, "parameters", "}", JSON_WS + r"\}", "; ")
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON)}


def detect(chat_template: str | None) -> ToolFormat | None:
    """The format a chat template teaches its model, if it shows one this module reads."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HERMES
    if "<|python_tag|>" in chat_template or ('"parameters"' in chat_template and "tools" in chat_template):
        return LLAMA3_JSON
    return None


def resolve(setting: str, chat_template: str | None) -> ToolFormat | None:
    """`EngineConfig.tool_call_parser` for a model: a format's name, or `auto` (from the template)."""
    return detect(chat_template) if setting == "auto" else FORMATS[setting]


def constrained_tag(fmt: ToolFormat, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> str:
    """The structural tag (xgrammar's, as JSON text) whose outputs are one or more calls of `functions`
    (name, parameters schema) in `fmt`, and nothing else; at most one unless `parallel`."""
    tags = [{"type": "tag", "begin": fmt.begin(name), "content": {"type": "json_schema", "json_schema": schema},
             "end": fmt.end} for name, schema in functions]
    body = {"type": "tags_with_separator", "tags": tags, "separator": fmt.separator, "at_least_one": True,
            "stop_after_first": not parallel}
    return json.dumps({"type": "structural_tag", "format": body}, ensure_ascii=False)
