"""Offline generation: submit a batch, step the core until it drains, return outputs in input order.

The same three parts as the server, in one process and one thread: input processing, the engine core,
output processing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence as Seq
from typing import Any

from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.engine_core import EngineCore
from kvpilot.engine.errors import RequestFailed
from kvpilot.engine.input_processor import InputProcessor
from kvpilot.engine.messages import CoreOutputs, EngineRequest
from kvpilot.engine.model_info import eos_token_ids, load_tokenizer, resolve
from kvpilot.engine.output_processor import OutputProcessor
from kvpilot.engine.outputs import RequestOutput
from kvpilot.engine.worker import resolve_device

Prompt = str | list[int]

# Offline on a GPU a whole batch is known up front: more sequences and a larger step share each read of the
# weights among more tokens. vLLM's LLM takes the same limits on large GPUs; its server, like EngineConfig's
# defaults (what `kvpilot serve`, the CRD and the tuner start from), keeps the smaller token budget for latency.
# On one H200 this gave +9% on random 256/256 (8B), +5% with shared prefixes, and 2.1x on Qwen3-30B-A3B's
# random workload (bench/results/h200-2026-12-01-s5/).
OFFLINE_GPU_DEFAULTS: dict[str, int] = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}


def offline_config(model: str, engine_config: dict[str, Any], on_gpu: bool) -> EngineConfig:
    """The LLM's config: the user's values, else OFFLINE_GPU_DEFAULTS on a GPU, else EngineConfig's defaults."""
    defaults = OFFLINE_GPU_DEFAULTS if on_gpu else {}
    return EngineConfig(model=model, **{**defaults, **engine_config})


class LLM:
    """`LLM(model="demo", max_num_seqs=8).generate(["Hello"], SamplingParams(max_tokens=8))`."""

    def __init__(self, model: str, **engine_config: Any) -> None:
        config = EngineConfig(model=model, **engine_config)
        if resolve_device(config).type == "cuda":
            config = offline_config(model, engine_config, on_gpu=True)
        info = resolve(config)
        self.config = info.config
        self.tokenizer: Any = load_tokenizer(info.model_dir)
        self.core = EngineCore(info, eos_token_ids(info, self.tokenizer))
        self.inputs = InputProcessor.for_model(self.tokenizer, info.arch.vocab_size, self.core.info)
        self.outputs = OutputProcessor(self.tokenizer)

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Process and submit one request; `step()` moves it on."""
        token_ids = self.inputs.process(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        arrival = time.monotonic()
        self.core.add(EngineRequest(request_id, token_ids, params, arrival))
        self.outputs.add(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, arrival)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        return self.outputs.abort(request_id)

    def step(self, stream: bool = False) -> list[RequestOutput]:
        """One engine step; outputs of finished requests (every touched one with stream=True)."""
        batch = CoreOutputs(self.core.step(), timestamp=time.monotonic())
        outputs, stopped = self.outputs.process(batch, stream=stream)
        if stopped:
            self.core.finish_samples(stopped)
        for out in outputs:
            if out.error is not None:
                raise RequestFailed(out.request_id)
        return outputs

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
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for request_id in ids:
                self.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            if not self.core.has_unfinished:
                raise RuntimeError("engine idle with unfinished requests: a scheduling invariant broke")
            for out in self.step():
                done[out.request_id] = out
        while self.core.has_unfinished and not self.core.requests:  # the step launched after the last output
            self.step()
        return [done[i] for i in ids]
