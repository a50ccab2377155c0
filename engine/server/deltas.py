"""What each streamed chunk adds: new text and logprobs per choice, from the engine's cumulative outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpilot.engine.outputs import RequestOutput, TokenLogprob
from kvpilot.engine.server.responses import UsageInfo


class RequestAborted(Exception):
    """The engine ended a choice with finish_reason 'abort' (drain timeout or shutdown)."""


@dataclass
class Delta:
    index: int  # choice index: prompt index * n + sample index
    text: str
    logprobs: list[TokenLogprob]
    text_offset: int  # where `text` starts in the choice's whole text
    finish_reason: str | None
    stop_reason: str | int | None
    first: bool  # the choice's first delta
    prompt: RequestOutput | None = None  # on a choice's first delta: its request (prompt text, ids, logprobs)


@dataclass
class DeltaTracker:
    n: int
    num_prompts: int
    _sent_chars: dict[int, int] = field(default_factory=dict)
    _sent_logprobs: dict[int, int] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)
    _prompt_tokens: dict[int, int] = field(default_factory=dict)
    _completion_tokens: dict[int, int] = field(default_factory=dict)

    def update(self, prompt_index: int, out: RequestOutput) -> list[Delta]:
        self._prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        deltas = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            if index in self._finished:
                continue
            if o.finish_reason == "abort":
                raise RequestAborted(f"choice {index} was aborted")
            gained = out.new_token_counts[o.index] if o.index < len(out.new_token_counts) else 0
            sent = self._sent_chars.get(index, 0)
            text = o.text[sent:]
            if not (gained or text or o.finish_reason):
                continue
            first = index not in self._sent_chars
            self._sent_chars[index] = max(sent, len(o.text))
            lp_sent = self._sent_logprobs.get(index, 0)
            new_logprobs = (o.logprobs or [])[lp_sent:]
            self._sent_logprobs[index] = lp_sent + len(new_logprobs)
            self._completion_tokens[index] = len(o.token_ids)
            if o.finish_reason:
                self._finished.add(index)
            deltas.append(Delta(index, text, new_logprobs, sent, o.finish_reason, o.stop_reason, first,
                                out if first else None))
        return deltas

    def usage(self) -> UsageInfo:
        return UsageInfo.of(sum(self._prompt_tokens.values()), sum(self._completion_tokens.values()))


def check_not_aborted(outputs: list[RequestOutput]) -> None:
    if any(o.finish_reason == "abort" for out in outputs for o in out.outputs):
        raise RequestAborted("the request was aborted")


def final_usage(outputs: list[RequestOutput]) -> UsageInfo:
    return UsageInfo.of(
        sum(len(out.prompt_token_ids) for out in outputs),
        sum(len(o.token_ids) for out in outputs for o in out.outputs),
    )
