"""OpenAI's tool-calling request shapes: the functions a chat offers, which one it must call, and the calls an
assistant message carries back into the conversation. Bounded, and checked for what OpenAI refuses."""

from __future__ import annotations

import json
from typing import Any, Literal

from kvpilot.engine.structured.params import MAX_GRAMMAR_CHARS
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME, description="letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of an object; none: no "
                                              "arguments")
    strict: bool | None = Field(default=None, description="accepted: a required or named call always follows "
                                "the schema, and auto never constrains")

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if value.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type 'object'")
        if len(json.dumps(value)) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"a function's parameters schema must not exceed {MAX_GRAMMAR_CHARS} characters")
        return value

    def schema(self) -> dict[str, Any]:
        """The arguments' schema: OpenAI reads missing parameters as an empty parameter list."""
        if self.parameters is None:
            return {"type": "object", "properties": {}}
        return {"type": "object", **self.parameters}


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="JSON text, as the assistant produced it")


class ToolCallParam(_Strict):
    """A call in an assistant message of the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """Chat templates (transformers' convention) render arguments as an object; a call whose arguments
        are not a JSON object (one cut off) keeps its text."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


def check_tools(tools: list[Tool] | None) -> list[Tool] | None:
    names = [t.function.name for t in tools or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"function names must be unique; repeated: {', '.join(repeated)}")
    return tools


def check_tool_choice(choice: ToolChoice | None, tools: list[Tool] | None) -> ToolChoice | None:
    """OpenAI's rules: a choice needs tools, and a named function must be one of them."""
    if choice is None or choice == "none":
        return choice
    names = [t.function.name for t in tools or []]
    if not names:
        raise ValueError("tool_choice is only allowed when tools are specified")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"tool_choice names function '{choice.function.name}', which is not in tools "
                         f"(the request offers: {', '.join(names)})")
    return choice
