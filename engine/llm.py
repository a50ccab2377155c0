"""Offline generation: submit a batch, step the core until it drains, return outputs in input order."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.engine_core import EngineCore
from kvpilot.engine.outputs import RequestOutput

Prompt = str | list[int]


class LLM:
    """`LLM(model="demo", max_num_seqs=8).generate(["Hello"], SamplingParams(max_tokens=8))`."""

    def __init__(self, model: str, **engine_config: Any) -> None:
        self.config = EngineConfig(model=model, **engine_config)
        self.core = EngineCore(self.config)

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.core.add_request(prompt, p).request_id)
        except Exception:
            for request_id in ids:
                self.core.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            if not self.core.scheduler.has_work:
                raise RuntimeError("engine idle with unfinished requests: a scheduling invariant broke")
            for out in self.core.step(stream=False):
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]
