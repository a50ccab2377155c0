"""The engine core: one `step()` = schedule -> run the model -> sample -> update requests -> outputs.

Everything here is synchronous and single-threaded; the offline `LLM` loops over `step()`, and the
`AsyncEngine` drives it from a background loop.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.demo import resolve_model_path
from kvpilot.engine.detokenizer import IncrementalDetokenizer, find_stop
from kvpilot.engine.errors import RequestRejected, is_engine_fault
from kvpilot.engine.input_processor import InputProcessor
from kvpilot.engine.kv_cache import KVCacheManager
from kvpilot.engine.models.arch import ModelArch, load_arch
from kvpilot.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvpilot.engine.parallel import SINGLE, check_divisible, destroy_process_group
from kvpilot.engine.request import Request, SeqStatus, Sequence
from kvpilot.engine.sampler import Sampler
from kvpilot.engine.scheduler import Scheduler
from kvpilot.engine.worker import WorkerPool, build_runner, resolve_device, start_tensor_parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    num_preemptions: int


def _eos_ids(model_dir: Path, arch: ModelArch, tokenizer: object | None) -> tuple[int, ...]:
    ids = set(arch.eos_token_ids)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos_tok = getattr(tokenizer, "eos_token_id", None)
    if eos_tok is not None:
        ids.add(eos_tok)
    return tuple(sorted(ids))


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.model_dir = resolve_model_path(config.model)
        arch = load_arch(self.model_dir)
        max_len = config.max_model_len or arch.max_position_embeddings
        if max_len > arch.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_len}) exceeds the model's max_position_embeddings "
                f"({arch.max_position_embeddings})"
            )
        if arch.sliding_window and max_len > arch.sliding_window:
            log.warning("sliding window %d is not implemented: capping max_model_len to it", arch.sliding_window)
            max_len = arch.sliding_window
        self.config = config.model_copy(update={"max_model_len": max_len})
        self.arch = arch
        self.tokenizer = self._load_tokenizer()
        self.workers: WorkerPool | None = None
        tp = SINGLE
        if config.tensor_parallel_size > 1:
            check_divisible(arch, config.tensor_parallel_size)
            resolve_device(self.config)  # fail fast when there are too few GPUs, before spawning anything
            self.workers, tp = start_tensor_parallel(self.config, self.model_dir, arch)
        try:
            self.runner = build_runner(self.config, self.model_dir, arch, tp)
        except BaseException:
            self.close()
            raise
        if self.workers is not None:
            self.runner.on_step = self.workers.send
        device = self.runner.device
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv)
        self.eos_token_ids = _eos_ids(self.model_dir, arch, self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids, device, config.seed)
        self.inputs = InputProcessor.for_model(self.tokenizer, arch.vocab_size, max_len)
        self.requests: dict[str, Request] = {}
        self.detoks: dict[int, IncrementalDetokenizer] = {}

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
            destroy_process_group()

    def _load_tokenizer(self) -> object | None:
        if not any((self.model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            log.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", self.model_dir)
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    # ---- requests ---------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Reject at once what could never be served: over max_model_len or over the whole KV pool."""
        max_len = self.config.max_model_len or 0
        if num_prompt_tokens == 0:
            raise RequestRejected("prompt is empty: send at least one token", param="prompt")
        total = num_prompt_tokens + params.max_tokens
        if total > max_len:
            raise RequestRejected(
                f"this model's maximum context length is {max_len} tokens, but the request asks for "
                f"{total} ({num_prompt_tokens} in the prompt + {params.max_tokens} max_tokens)",
                param="max_tokens",
            )
        need = self.kv.blocks_for(total - 1)
        if need > self.kv.num_blocks:
            raise RequestRejected(
                f"the request needs {need} KV blocks ({total} tokens) but the whole pool holds "
                f"{self.kv.num_blocks}: shorten the prompt or max_tokens",
                param="max_tokens",
            )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Tokenize, validate and admit (the offline path; the server processes inputs off its event loop)."""
        token_ids = self.inputs.process(prompt, params)
        text = prompt if isinstance(prompt, str) else None
        return self.add_processed(token_ids, params, request_id, arrival_time, text)

    def add_processed(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> Request:
        """Admit a request whose inputs `self.inputs` already processed."""
        self.check_fits(len(token_ids), params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already running", param="request_id")
        request = Request(
            request_id, prompt_text, token_ids, params, RequestMetrics(arrival_time=arrival_time or time.monotonic())
        )
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(request, i, list(token_ids), len(token_ids), generator=gen)
            request.seqs.append(seq)
            if self.tokenizer is not None:
                self.detoks[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        return self._pop_output(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            prefix_cache_hits=self.kv.prefix_hits,
            prefix_cache_queries=self.kv.prefix_queries,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # ---- the step ---------------------------------------------------------------------------
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """One engine iteration. With stream=False only finished requests get an output (offline use).

        A failure that belongs to requests (not to the device) fails those requests alone: they finish
        with an error and free their blocks, and the engine keeps serving the rest.
        """
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        failed: list[RequestOutput] = []
        try:
            result = self.runner.execute(sched.scheduled)
        except Exception as exc:
            if is_engine_fault(exc) or self.workers is not None:  # ranks would disagree on what ran
                raise
            for request in {id(seq.request): seq.request for seq, _ in sched.scheduled}.values():
                failed.append(self._fail(request, exc))
            return failed
        for seq, n in sched.scheduled:
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq)
        sampled, tokens, logprobs = self._sample(result.logits, result.sampled, failed)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            if seq.request.error is not None:  # a sibling sample failed this step
                continue
            try:
                self._append(seq, token, logprob)
            except Exception as exc:
                if is_engine_fault(exc):
                    raise
                failed.append(self._fail(seq.request, exc))
                continue
            metrics = seq.request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            touched[seq.request.request_id] = seq.request
        outputs = [
            self._pop_output(r) if r.finished else self._output(r)
            for r in touched.values()
            if r.error is None and (stream or r.finished)
        ]
        return failed + outputs

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], failed: list[RequestOutput]
    ) -> tuple[list[Sequence], list[int], list[object]]:
        """Sample the batch at once; if that fails, row by row, so only the rows at fault fail."""
        if not seqs:
            return [], [], []
        try:
            tokens, logprobs = self.sampler(logits, seqs)
            return seqs, tokens, list(logprobs)
        except Exception as exc:
            if is_engine_fault(exc):
                raise
            log.warning("batched sampling failed (%s): isolating the failing request", exc)
        kept: list[Sequence] = []
        tokens, logprobs = [], []
        for i, seq in enumerate(seqs):
            if seq.request.error is not None:
                continue
            try:
                token, logprob = self.sampler(logits[i : i + 1], [seq])
            except Exception as exc:
                if is_engine_fault(exc):
                    raise
                failed.append(self._fail(seq.request, exc))
                continue
            kept.append(seq)
            tokens += token
            logprobs += logprob
        return kept, tokens, logprobs

    def _fail(self, request: Request, exc: BaseException) -> RequestOutput:
        """End a request that an error in its own processing broke; the engine carries on."""
        log.error("request %s failed: %s: %s", request.request_id, type(exc).__name__, exc, exc_info=exc)
        request.error = f"{type(exc).__name__}: {exc}"
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "error")
        return self._pop_output(request)

    def _append(self, seq: Sequence, token: int, logprob: object) -> None:
        seq.token_ids.append(token)
        seq.new_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)  # type: ignore[arg-type]
        p = seq.params
        detok = self.detoks.get(seq.seq_id)
        new_text = detok.add([token]) if detok is not None else ""
        seq.text += new_text
        if not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif token in p.stop_token_set:
            self._finish(seq, "stop", token)
        elif p.stop and (hit := find_stop(seq.text, len(new_text), p.stop)):
            seq.text = seq.text[: hit[0]]
            self._finish(seq, "stop", hit[1])
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= (self.config.max_model_len or 0):
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SeqStatus.FINISHED
        self.scheduler.remove(seq)
        self.detoks.pop(seq.seq_id, None)

    def _output(self, request: Request) -> RequestOutput:
        holdback = max((len(s) for s in request.params.stop), default=1) - 1
        outputs = []
        for seq in request.seqs:
            text = seq.text if seq.finished or not holdback else seq.text[: max(0, len(seq.text) - holdback)]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    token_ids=seq.output_token_ids,
                    text=text,
                    logprobs=list(seq.logprobs) if request.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        counts = [seq.new_tokens for seq in request.seqs]
        for seq in request.seqs:
            seq.new_tokens = 0
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            metrics=request.metrics,
            finished=request.finished,
            new_token_counts=counts,
            error=request.error,
        )

    def _pop_output(self, request: Request) -> RequestOutput:
        request.metrics.finished_time = time.monotonic()
        del self.requests[request.request_id]
        return self._output(request)
