"""Output processing: the core's token updates become cumulative RequestOutputs with text.

Detokenization, stop strings and the holdback of text that could still become one happen here, on the
front's side, so the engine core never waits on string work. A stop string ends its sample here first; the
caller tells the core, which may meanwhile have sampled a token or two more that are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.detokenizer import IncrementalDetokenizer, find_stop
from kvpilot.engine.messages import CoreOutputs
from kvpilot.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob


@dataclass
class _Sample:
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[_Sample]
    holdback: int
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float) -> None:
        def detok() -> IncrementalDetokenizer | None:
            if self.tokenizer is None:
                return None
            return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)

        self.requests[request_id] = _Request(
            request_id, prompt, prompt_token_ids, params, RequestMetrics(arrival_time=arrival_time),
            [_Sample(detok()) for _ in range(params.n)], max((len(s) for s in params.stop), default=1) - 1,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def process(self, batch: CoreOutputs, stream: bool = True) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Apply one step's updates. Returns the outputs (only finished ones unless `stream`) and the samples
        that stop strings ended, which the core must be told about."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[str, int]] = []
        for core_out in batch.outputs:
            req = self.requests.get(core_out.request_id)
            if req is None:  # aborted here already
                continue
            m = req.metrics
            m.first_scheduled_time = m.first_scheduled_time or core_out.first_scheduled_time
            m.num_cached_tokens = max(m.num_cached_tokens, core_out.num_cached_tokens)
            m.num_preemptions = core_out.num_preemptions
            if core_out.prompt_logprobs and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(core_out.prompt_logprobs)
            if core_out.error is not None:
                req.error = core_out.error
                for sample in req.samples:
                    sample.finish_reason = sample.finish_reason or "error"
            gained = False
            for update in core_out.seqs:
                sample = req.samples[update.index]
                if sample.finished:
                    continue
                for i, token in enumerate(update.new_token_ids):
                    gained = True
                    if self._append(req, sample, token, update.new_logprobs[i] if update.new_logprobs else None):
                        stopped.append((req.request_id, update.index))
                        break
                if update.finish_reason is not None and not sample.finished:
                    sample.finish_reason, sample.stop_reason = update.finish_reason, update.stop_reason
            if gained:
                m.first_token_time = m.first_token_time or batch.timestamp
                m.last_token_time = batch.timestamp
            if req.finished:
                outputs.append(self._pop(req))
            elif stream:
                outputs.append(self._output(req))
        return outputs, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request on the front's side (client gone, drain): its unfinished samples end with 'abort'."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for sample in req.samples:
            sample.finish_reason = sample.finish_reason or "abort"
        return self._pop(req)

    def _append(self, req: _Request, sample: _Sample, token: int, logprob: TokenLogprob | None) -> bool:
        """Add one token; True if a stop string ended the sample with it."""
        sample.token_ids.append(token)
        sample.new_tokens += 1
        if logprob is not None:
            sample.logprobs.append(logprob)
        if sample.detok is None:
            return False
        new_text = sample.detok.add([token])
        sample.text += new_text
        stops = req.params.stop
        if stops and (hit := find_stop(sample.text, len(new_text), stops)):
            sample.text = sample.text[: hit[0]]
            sample.finish_reason, sample.stop_reason = "stop", hit[1]
            return True
        return False

    def _output(self, req: _Request) -> RequestOutput:
        outputs = []
        for index, s in enumerate(req.samples):
            hold = req.holdback if not s.finished else 0
            outputs.append(CompletionOutput(
                index=index,
                token_ids=list(s.token_ids),
                text=s.text[: max(0, len(s.text) - hold)] if hold else s.text,
                logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
        counts = [s.new_tokens for s in req.samples]
        for s in req.samples:
            s.new_tokens = 0
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            metrics=req.metrics,
            finished=req.finished,
            new_token_counts=counts,
            error=req.error,
            prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        )

    def _pop(self, req: _Request) -> RequestOutput:
        req.metrics.finished_time = time.monotonic()
        del self.requests[req.request_id]
        return self._output(req)
