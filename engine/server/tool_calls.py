"""Tool calling on /v1/chat/completions: what a request's tools do to its prompt, its output constraint and its
output, in OpenAI's shapes.

`plan` reads `tools`, `tool_choice` and `parallel_tool_calls` once. The chat template renders the tools,
except under tool_choice "none" (a model shown tools it may not call tends to call them anyway). "required"
and a named function become a structural tag in the model's own call format, run through the ordinary
constrained-decoding path; "auto" leaves the model free. Each choice's text then goes through the format's
parser, whole or as a stream, into `tool_calls`.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.server.errors import APIError
from kvpilot.engine.server.protocol import ChatCompletionRequest
from kvpilot.engine.server.responses import (
    AssistantMessage,
    ChatDelta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from kvpilot.engine.server.tool_protocol import NamedToolChoice
from kvpilot.engine.structured import grammar
from kvpilot.engine.structured.params import StructuredOutputs
from kvpilot.engine.tools.formats import FORMATS, ToolFormat, constrained_tag
from kvpilot.engine.tools.parser import CallArguments, CallStart, Content, Event, ParsedMessage, ToolCallParser


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None = None  # what the chat template renders
    fmt: ToolFormat | None = None  # None: the output is content only
    names: tuple[str, ...] = ()
    constraint: StructuredOutputs | None = None  # required / a named function
    max_calls: int | None = None  # 1 when parallel_tool_calls is false

    def parser(self) -> ToolCallParser | None:
        if self.fmt is None:
            return None
        return ToolCallParser(self.fmt, self.names, self.max_calls, constrained=self.constraint is not None)


def plan(fmt: ToolFormat | None, body: ChatCompletionRequest) -> ToolPlan:
    """The request's tool handling for a model whose format is `fmt`; a 400 for what cannot be honoured.

    CPU work (each schema is built as a grammar, to refuse one that could not be enforced): the handler runs
    it on the engine's input threads."""
    choice = body.effective_tool_choice
    if not body.tools or choice == "none":
        return ToolPlan()
    if fmt is None:
        raise APIError(400, "this model's chat template shows no tool-call format this server reads "
                       f"({', '.join(FORMATS)}): serve it with --tool-call-parser naming the one it was trained "
                       "on", param="tools", code="unsupported")
    for i, tool in enumerate(body.tools):
        param = f"tools.{i}.function.parameters"
        try:
            grammar.check(StructuredOutputs(json=tool.function.schema()), param)
        except RequestRejected as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from exc
    template_tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = tuple(t.function.name for t in body.tools)
    parallel = body.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
    max_calls = None if parallel else 1
    if choice == "auto":
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format with tools under tool_choice 'auto' is not supported: the output "
                           "could follow the format or call tools, not both", param="response_format",
                           code="unsupported")
        return ToolPlan(template_tools, fmt, names, None, max_calls)
    if body.structured() is not None:
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        raise APIError(400, f"tool_choice {'required' if choice == 'required' else 'naming a function'} "
                       f"constrains the output to tool calls: drop {param}", param=param)
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    chosen = [t for t in body.tools if named in (None, t.function.name)]
    tag = constrained_tag(fmt, [(t.function.name, t.function.schema()) for t in chosen], parallel)
    return ToolPlan(template_tools, fmt, names, StructuredOutputs(structural_tag=tag), max_calls)


def finish_reason(reason: str | None, num_calls: int) -> str | None:
    """OpenAI's "tool_calls" when a choice that called tools ended by itself."""
    return "tool_calls" if num_calls and reason == "stop" else reason


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message(tools: ToolPlan, text: str) -> tuple[AssistantMessage, int]:
    """A whole choice's message, and how many calls it holds."""
    parser = tools.parser()
    if parser is None:
        return AssistantMessage(content=text), 0
    parsed = ParsedMessage().add([*parser.feed(text), *parser.finish()])
    calls = [ToolCall(id=_call_id(), function=FunctionCall(name=name, arguments=arguments))
             for name, arguments in parsed.calls]
    return AssistantMessage(content=parsed.content or (None if calls else ""), tool_calls=calls), len(calls)


class ChoiceStream:
    """One streamed choice: its text through the plan's parser, as OpenAI's delta pieces."""

    def __init__(self, tools: ToolPlan) -> None:
        self._parser = tools.parser()

    @property
    def num_calls(self) -> int:
        return self._parser.num_calls if self._parser is not None else 0

    def pieces(self, text: str, finished: bool) -> list[ChatDelta]:
        if self._parser is None:
            return [ChatDelta(content=text)] if text else []
        events = self._parser.feed(text)
        if finished:
            events += self._parser.finish()
        return list(_pieces(events))


def _run_key(e: Event) -> tuple[str, int]:
    if isinstance(e, Content):
        return "content", -1
    return ("start" if isinstance(e, CallStart) else "arguments"), e.index


def _pieces(events: list[Event]) -> Iterable[ChatDelta]:
    """Runs of content as one piece; a call's index, id and name as one; each run of its arguments as one."""
    for (kind, index), group in itertools.groupby(events, _run_key):
        run = list(group)
        if kind == "start":
            (start,) = run
            assert isinstance(start, CallStart)
            yield ChatDelta(tool_calls=[ToolCallDelta(index=index, id=_call_id(), type="function",
                                                      function=FunctionCallDelta(name=start.name, arguments=""))])
            continue
        text = "".join(e.text for e in run if isinstance(e, Content | CallArguments))
        if kind == "content":
            yield ChatDelta(content=text)
        else:
            yield ChatDelta(tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=text))])
