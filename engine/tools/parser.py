"""Tool calls read out of a sample's text as it grows: one incremental parse for a stream and a whole response
alike, so a stream's deltas always assemble to the non-streamed message.

A call is recognised by its header, `{"name": "<one of the request's functions>", "arguments": {` (or
"parameters"; any JSON spacing), after the format's start marker (Hermes) or at the start of the message and
after each call (Llama 3.1); its arguments are the model's own text of the object that follows, ended by the
brace that closes it. Text that could still become a call is held back, never sent as content and taken back.

When a grammar guarantees the arguments (`tool_choice` required or a named function), a call is sent from its
header on and its arguments piece by piece as they are generated (one cut off by max_tokens keeps what it had).
Free output (`auto`) may be malformed, so a call is sent once its arguments are a complete JSON object; a call
that is not (bad JSON, an unknown function, cut off) is content, exactly as the model wrote it: malformed
output is never lost and never an error. Whitespace between calls, or between a call and text, is dropped.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import regex
from kvpilot.engine.tools.formats import JSON_WS, ToolFormat

_WS_CHARS = " \t\n\r"
_HEADER = (JSON_WS + r"\{" + JSON_WS + r'"name"' + JSON_WS + ":" + JSON_WS + r'"(?P<name>[A-Za-z0-9_.\-]{1,64})"'
           + JSON_WS + "," + JSON_WS + r'"(?:arguments|parameters)"' + JSON_WS + ":" + JSON_WS + r"\{")
_MARKED_HEADER = regex.compile(_HEADER)  # after a start marker
_FIRST_HEADER = regex.compile(JSON_WS + r"(?:<\|python_tag\|>)?" + _HEADER)  # a message that is calls
_NEXT_HEADER = regex.compile(JSON_WS + ";?" + _HEADER)  # the next of them


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str  # the next piece of the call's arguments (JSON text)


Event = Content | CallStart | CallArguments


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class _State(enum.Enum):
    TEXT = enum.auto()  # content, watching for a start marker
    HEADER = enum.auto()  # a call may be starting: held until its header matches or cannot
    ARGUMENTS = enum.auto()  # inside a call's arguments object
    TAIL = enum.auto()  # what closes a call after its arguments
    PLAIN = enum.auto()  # no call can follow: the rest is content


@dataclass
class _Scanner:
    """Where a JSON value's text stands: nesting depth, inside a string, after a backslash."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def end(self, text: str) -> int | None:
        """The index just past the bracket that closes the value, if `text` holds it."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class ToolCallParser:
    """Feed a sample's text as it grows; events say what became content and what became calls."""

    def __init__(self, fmt: ToolFormat, names: Iterable[str], max_calls: int | None = None,
                 constrained: bool = False) -> None:
        self.fmt = fmt
        self.names = frozenset(names)
        self.max_calls = max_calls
        self.constrained = constrained  # a grammar guarantees every call: send arguments as they come
        self.num_calls = 0
        self._state = _State.TEXT if fmt.start_marker else _State.HEADER
        self._buf = ""  # text read but not yet decided
        self._pending = ""  # a start marker (and the whitespace before it) that a failed header gives back
        self._after_call = False  # whitespace right after a call is dropped
        self._scanner = _Scanner()
        self._call: tuple[str, str] = ("", "")  # an unconstrained call held whole: its name and text so far
        self._arguments_text = ""
        self._tail = regex.compile(fmt.tail)
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("the parser has finished")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """The sample ended: whatever was held back is decided now."""
        events = self._run(final=True)
        self._finished = True
        return events

    # ---- states -------------------------------------------------------------------------------
    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        handlers = {_State.TEXT: self._text, _State.HEADER: self._header, _State.ARGUMENTS: self._arguments,
                    _State.TAIL: self._close, _State.PLAIN: self._plain}
        while handlers[self._state](out, final):
            pass
        return out

    def _content(self, text: str, out: list[Event]) -> None:
        if self._after_call:
            text = text.lstrip(_WS_CHARS)
            if not text:
                return
            self._after_call = False
        if text:
            out.append(Content(text))

    def _calls_left(self) -> bool:
        return self.max_calls is None or self.num_calls < self.max_calls

    def _text(self, out: list[Event], final: bool) -> bool:
        marker = self.fmt.start_marker or ""
        buf = self._buf
        at = buf.find(marker)
        if at >= 0:
            head = buf[:at].rstrip(_WS_CHARS)
            self._content(head, out)
            self._pending = buf[len(head):at + len(marker)]
            self._buf = buf[at + len(marker):]
            self._state = _State.HEADER
            return True
        if final:
            self._content(buf, out)
            self._buf = ""
            return False
        held = next((n for n in range(min(len(marker) - 1, len(buf)), 0, -1) if buf.endswith(marker[:n])), 0)
        head = buf[:len(buf) - held].rstrip(_WS_CHARS)  # whitespace waits: it is dropped before a call
        self._content(head, out)
        self._buf = buf[len(head):]
        return False

    def _header(self, out: list[Event], final: bool) -> bool:
        pattern = _MARKED_HEADER if self.fmt.start_marker else _NEXT_HEADER if self.num_calls else _FIRST_HEADER
        m = pattern.match(self._buf)
        if m is not None and m.group("name") in self.names:
            if self.constrained:
                out.append(CallStart(self.num_calls, m.group("name")))
                self.num_calls += 1
                self._after_call = False
            self._call = (m.group("name"), self._pending + self._buf[:m.end() - 1])
            self._pending, self._arguments_text = "", ""
            self._buf = self._buf[m.end() - 1:]  # from the arguments' opening brace
            self._scanner = _Scanner()
            self._state = _State.ARGUMENTS
            return True
        if m is None and pattern.fullmatch(self._buf, partial=True) is not None:
            if not final:
                return False  # could still become a header
            if self.num_calls and not self.fmt.start_marker and not self._buf.strip(_WS_CHARS + ";"):
                self._buf = ""  # a separator after the last call
                return False
        self._content(self._pending, out)
        self._pending = ""
        self._state = _State.TEXT if self.fmt.start_marker else _State.PLAIN
        return True

    def _arguments(self, out: list[Event], final: bool) -> bool:
        end = self._scanner.end(self._buf)
        piece = self._buf if end is None else self._buf[:end]
        self._buf = "" if end is None else self._buf[end:]
        if self.constrained:
            if piece:
                out.append(CallArguments(self.num_calls - 1, piece))
        else:
            self._arguments_text += piece
        if end is None:
            if final and not self.constrained:
                self._content(self._call[1] + self._arguments_text, out)  # never completed
            return False
        if not self.constrained and not self._held_call_done(out):
            self._content(self._call[1] + self._arguments_text, out)
            self._state = _State.TEXT if self.fmt.start_marker else _State.PLAIN
            return True
        self._state = _State.TAIL
        return True

    def _held_call_done(self, out: list[Event]) -> bool:
        """Send an unconstrained call whose arguments closed, if they are a JSON object."""
        try:
            arguments = json.loads(self._arguments_text, parse_constant=_not_json)
        except ValueError:
            return False
        if not isinstance(arguments, dict):
            return False
        out += [CallStart(self.num_calls, self._call[0]), CallArguments(self.num_calls, self._arguments_text)]
        self.num_calls += 1
        self._after_call = False
        return True

    def _close(self, out: list[Event], final: bool) -> bool:
        m = self._tail.match(self._buf)
        if m is not None:
            self._buf = self._buf[m.end():]
        elif self._tail.fullmatch(self._buf, partial=True) is not None:
            if not final:
                return False
            self._buf = ""  # a closing cut off at the end
        else:
            self._buf = self._buf[regex.match(JSON_WS + r"\}?", self._buf).end():]
        self._after_call = True
        if not self._calls_left():
            self._state = _State.PLAIN
        else:
            self._state = _State.TEXT if self.fmt.start_marker else _State.HEADER
        return True

    def _plain(self, out: list[Event], final: bool) -> bool:
        self._content(self._buf, out)
        self._buf = ""
        return False


@dataclass
class ParsedMessage:
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (function name, arguments JSON text)

    def add(self, events: Iterable[Event]) -> ParsedMessage:
        for e in events:
            if isinstance(e, Content):
                self.content += e.text
            elif isinstance(e, CallStart):
                self.calls.append((e.name, ""))
            else:
                name, arguments = self.calls[e.index]
                self.calls[e.index] = (name, arguments + e.text)
        return self


def parse(fmt: ToolFormat, names: Iterable[str], text: str, max_calls: int | None = None,
          constrained: bool = False) -> ParsedMessage:
    """A whole sample's text at once: the same result as feeding it in any pieces."""
    parser = ToolCallParser(fmt, names, max_calls, constrained)
    return ParsedMessage().add([*parser.feed(text), *parser.finish()])
