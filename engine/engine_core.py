"""The engine core: token ids in, token ids out. One `step()` = schedule -> launch -> collect.

With async scheduling (the default) the host prepares and launches step N+1 while the GPU still runs step N:
step N's samples stay on the device and feed step N+1's inputs, and are read back (one synchronisation per
step) only after step N+1 is queued. A sample that ends its sequence (EOS, a stop token) is therefore
known one step late, and that sequence's row in step N+1 is dropped. Steps that need every token on the
host first (repetition or frequency penalties, tensor parallelism) run synchronously; a grammar needs only the
last token, read back while the next forward runs. Outputs are the same either way.

Input processing (tokenization, validation) and output processing (detokenization, stop strings) are the
front's work (input_processor.py, output_processor.py); here everything is token ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from kvpilot.engine.errors import RequestRejected, is_engine_fault
from kvpilot.engine.input_processor import check_fits
from kvpilot.engine.kv_cache import KVCacheManager
from kvpilot.engine.messages import CoreInfo, CoreOutput, EngineRequest, EngineStats, SeqUpdate
from kvpilot.engine.model_info import ModelInfo
from kvpilot.engine.outputs import RequestMetrics, TokenLogprob
from kvpilot.engine.parallel import SINGLE, check_divisible, destroy_process_group
from kvpilot.engine.request import PLACEHOLDER, Request, SeqStatus, Sequence
from kvpilot.engine.sampler import (
    PromptLogprobBatch,
    SampledBatch,
    Sampler,
    read_logprobs,
    read_prompt_logprobs,
)
from kvpilot.engine.scheduler import Scheduler
from kvpilot.engine.step_sampling import sample_isolating, still_sampled
from kvpilot.engine.structured.compiler import GrammarCompiler
from kvpilot.engine.structured.gate import GrammarGate
from kvpilot.engine.structured.matchers import BitmaskFiller, GrammarMask
from kvpilot.engine.warm_up import warm_up
from kvpilot.engine.worker import WorkerPool, build_runner, resolve_device, start_tensor_parallel

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step whose outputs are still on the device (or on their way to pinned host memory)."""

    seqs: list[Sequence]  # sampled, in row order
    samples: SampledBatch | None
    host_tokens: torch.Tensor | None
    done: torch.cuda.Event | None
    rows: dict[int, int] = field(default_factory=dict)  # seq id -> row, for the next step's inputs
    prompt: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, first position, count)
    prompt_logprobs: PromptLogprobBatch | None = None
    prompt_targets: list[int] = field(default_factory=list)
    ended: list[Sequence] = field(default_factory=list)  # prompt-only sequences whose prompt is now computed


class EngineCore:
    def __init__(self, info: ModelInfo, eos_token_ids: tuple[int, ...]) -> None:
        config = self.config = info.config
        self.arch = info.arch
        self.grammars = GrammarGate(GrammarCompiler(info.model_dir, info.arch.vocab_size, tuple(eos_token_ids)))
        self.workers: WorkerPool | None = None
        tp = SINGLE
        if config.tensor_parallel_size > 1:
            check_divisible(info.arch, config.tensor_parallel_size)
            resolve_device(config)  # fail fast when there are too few GPUs, before spawning anything
            self.workers, tp = start_tensor_parallel(config, info.model_dir, info.arch)
        try:
            self.runner = build_runner(config, info.model_dir, info.arch, tp)
        except BaseException:
            self.close()
            raise
        self.kv = self._new_pool()
        self.scheduler = Scheduler(config, self.kv)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(tuple(sorted(eos_token_ids)), self.runner.device, config.seed)
        # Ranks other than 0 need every input token id on the host, so tensor parallelism steps synchronously.
        self.async_scheduling = config.async_scheduling and self.workers is None
        self.requests: dict[str, Request] = {}
        self._in_flight: _InFlight | None = None
        self._bitmask: BitmaskFiller | None = None
        self.jump_forward_tokens = 0  # tokens appended without a decoding step of their own
        if self.runner.device.type == "cuda":
            warm_up(self)

    def reset(self) -> None:
        """An empty pool and prefix cache, zeroed counters and a re-seeded sampler: as if just started."""
        self.kv = self._new_pool()
        self.scheduler = Scheduler(self.config, self.kv)
        self.sampler = Sampler(self.sampler.eos_token_ids, self.runner.device, self.config.seed)
        self.grammars.compiler.reset_stats()
        self.jump_forward_tokens = 0

    def _new_pool(self) -> KVCacheManager:
        config = self.config
        return KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                              window=self.arch.kv_window)

    @property
    def info(self) -> CoreInfo:
        kv = self.kv
        return CoreInfo(kv.num_blocks, kv.block_size, self.config.max_model_len or 0,
                        kv.max_blocks_per_seq(self.config.max_num_batched_tokens))

    def close(self) -> None:
        """Stop the grammar compiler and the tensor-parallel workers, if any (also done at interpreter exit)."""
        self.grammars.compiler.close()
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
            destroy_process_group()

    # ---- requests ---------------------------------------------------------------------------
    def add(self, req: EngineRequest) -> None:
        """Admit a request whose inputs the front already processed."""
        params = req.params
        check_fits(self.info, len(req.prompt_token_ids), params.max_tokens)
        if req.request_id in self.requests:
            raise RequestRejected(f"request id {req.request_id!r} is already running", param="request_id")
        request = Request(req.request_id, req.prompt_token_ids, params, RequestMetrics(arrival_time=req.arrival_time))
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            request.seqs.append(Sequence(request, i, list(req.prompt_token_ids), len(req.prompt_token_ids),
                                         generator=gen))
        self.requests[req.request_id] = request
        if params.structured_outputs is not None:
            self.grammars.hold(request)  # scheduled once its grammar is compiled
        else:
            self._schedule(request)

    def _schedule(self, request: Request) -> None:
        for seq in request.seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> CoreOutput | None:
        """End a request now; its unfinished samples end with 'abort' and free their blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        updates = [SeqUpdate(s.index, [], None, "abort") for s in request.seqs if not s.finished]
        self.grammars.drop(request_id)
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        return self._pop(request, updates)

    def finish_samples(self, samples: list[tuple[str, int]]) -> None:
        """Samples the front ended (a stop string matched its text): free them."""
        for request_id, index in samples:
            request = self.requests.get(request_id)
            if request is None or request.seqs[index].finished:
                continue
            self._finish(request.seqs[index], "stop")
            if request.finished:
                del self.requests[request_id]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            num_empty_blocks=self.kv.num_empty_blocks,
            prefix_cache_hits=self.kv.prefix_hits,
            prefix_cache_queries=self.kv.prefix_queries,
            num_preemptions=self.scheduler.num_preemptions,
            grammar_compiles=self.grammars.compiler.num_compiles,
            grammar_compile_seconds=self.grammars.compiler.compile_seconds,
            grammar_cache_hits=self.grammars.compiler.num_cache_hits,
            jump_forward_tokens=self.jump_forward_tokens,
        )

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """One engine iteration; returns the updates of the step collected in it.

        A failure that belongs to requests (not to the device) fails those requests alone: they finish
        with an error and free their blocks, and the engine keeps serving the rest.
        """
        outputs = self._release_compiled()
        if self._in_flight is not None and self._needs_history():
            outputs += self._collect(self._in_flight)
            self._in_flight = None
        sched = self.scheduler.schedule()
        launched = self._launch(sched.scheduled, outputs) if sched.scheduled else None
        if launched is None and self._in_flight is None and not self.scheduler.has_work:
            self.grammars.wait(0.005)  # only grammars compiling: do not spin on the host they compile on
        if self._in_flight is not None:
            outputs += self._collect(self._in_flight)
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            outputs += self._collect(launched)
            self._in_flight = None
        return outputs

    def _release_compiled(self) -> list[CoreOutput]:
        """Constrained requests whose grammar is now compiled join the scheduler; a failed compile fails its own."""
        ready, failed = self.grammars.release()
        for request in ready:
            self._schedule(request)
        return [self._fail(request, exc) for request, exc in failed]

    def _needs_history(self) -> bool:
        """Whether a running sequence's sampling needs its previous tokens on the host (penalties)."""
        return any(seq.params.needs_history for seq in self.scheduler.running)

    def _launch(self, scheduled: list[tuple[Sequence, int]], failed: list[CoreOutput]) -> _InFlight | None:
        prev = self._in_flight
        inputs, plan = self.runner.prepare(scheduled, prev.rows if prev is not None else None)
        try:
            if self.workers is not None:
                self.workers.send(inputs)
            prev_tokens = prev.samples.tokens if prev is not None and prev.samples is not None else None
            logits, prompt = self.runner.run(inputs, prev_tokens)
            to_sample = plan.sampled
            if prev is not None and any(seq.grammar is not None for seq in to_sample):
                # The matchers must accept the previous step's tokens before this step's mask: read them back
                # now, while the device runs this step's forward.
                failed += self._collect(prev)
                self._in_flight = None
                logits, to_sample = still_sampled(logits, to_sample, scheduled)
            mask = self._grammar_mask(to_sample)  # on the host while the device runs the forward
            samples, sampled = sample_isolating(self.sampler, logits, to_sample, mask, self._fail, failed)
        except Exception as exc:
            if is_engine_fault(exc) or self.workers is not None:  # ranks would disagree on what ran
                raise
            for request in {id(seq.request): seq.request for seq, _ in scheduled}.values():
                failed.append(self._fail(request, exc))
            return None
        for seq, n in scheduled:
            if seq.finished:  # its request failed in this step's sampling: its blocks are already free
                continue
            seq.num_computed_tokens += n
            # Later steps run after this one on the stream: sharing its blocks, or reusing those it read that
            # fell behind the window, is safe before it finishes.
            self.kv.cache_full_blocks(seq)
            self.kv.release_outside_window(seq)
        for seq, first, count in plan.prompt:
            seq.prompt_logprobs_next = first + count
        if samples is None and prompt is None and not plan.ended:
            return None
        for seq in sampled:
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
        host = None
        if samples is not None:
            host = samples.tokens.to("cpu", non_blocking=True) if samples.tokens.is_cuda else samples.tokens
        done = None
        if self.runner.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        rows = {seq.seq_id: row for row, seq in enumerate(sampled)}
        return _InFlight(sampled, samples, host, done, rows, plan.prompt, prompt, inputs.prompt_targets, plan.ended)

    def _grammar_mask(self, sampled: list[Sequence]) -> GrammarMask | None:
        grammars = [(row, seq.grammar) for row, seq in enumerate(sampled) if seq.grammar is not None]
        if not grammars:
            return None
        if self._bitmask is None:
            self._bitmask = BitmaskFiller(self.arch.vocab_size, self.config.max_num_seqs, self.runner.device)
        return self._bitmask.fill(grammars, len(sampled))

    def _collect(self, flight: _InFlight) -> list[CoreOutput]:
        """Read a launched step's samples back (the step's one synchronisation) and move sequences on."""
        if flight.done is not None:
            flight.done.synchronize()
        updates: dict[str, list[SeqUpdate]] = {}
        touched: dict[str, Request] = {}
        prompt_lps = self._prompt_logprobs(flight, touched)
        for seq in flight.ended:  # prompt only (max_tokens 0): done once its prompt is computed
            if not seq.finished and seq.request.error is None:
                self._finish(seq, "length")
                touched[seq.request.request_id] = seq.request
                updates.setdefault(seq.request.request_id, []).append(SeqUpdate(seq.index, [], None, "length"))
        failed: list[CoreOutput] = []
        tokens = flight.host_tokens.tolist() if flight.host_tokens is not None else []
        asked = [seq.params.logprobs for seq in flight.seqs]
        logprobs = read_logprobs(flight.samples, asked, tokens) if flight.samples is not None else []
        for seq, token, logprob in zip(flight.seqs, tokens, logprobs, strict=True):
            if seq.finished or seq.request.error is not None:
                continue  # ended while this step ran (EOS one step earlier, an abort): the sample is dropped
            try:
                update = self._append(seq, token, logprob)
            except Exception as exc:
                if is_engine_fault(exc):
                    raise
                failed.append(self._fail(seq.request, exc))
                continue
            request = seq.request
            touched[request.request_id] = request
            updates.setdefault(request.request_id, []).append(update)
        outs = [self._pop(r, updates.get(i, [])) if r.finished else self._update(r, updates.get(i, []))
                for i, r in touched.items() if r.error is None]
        for out in outs:
            out.prompt_logprobs = prompt_lps.get(out.request_id)
        return failed + outs

    def _prompt_logprobs(self, flight: _InFlight, touched: dict[str, Request]) -> dict[str, list[TokenLogprob]]:
        """The prompt logprobs a collected step computed, per request (in prompt order: one sample owes them)."""
        if flight.prompt_logprobs is None:
            return {}
        entries = [(count, seq.params.prompt_logprobs or 0) for seq, _, count in flight.prompt]
        out: dict[str, list[TokenLogprob]] = {}
        for (seq, _, _), lps in zip(flight.prompt, read_prompt_logprobs(flight.prompt_logprobs, entries,
                                                                         flight.prompt_targets), strict=True):
            if seq.request.error is None and seq.request.request_id in self.requests:
                touched[seq.request.request_id] = seq.request
                out.setdefault(seq.request.request_id, []).extend(lps)
        return out

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> SeqUpdate:
        seq.fill_pending(token)
        p = seq.params
        update = SeqUpdate(seq.index, [token], [logprob] if logprob is not None else None)
        grammar = seq.grammar
        if grammar is not None and not grammar.accept(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        if (not p.ignore_eos and token in self.eos_token_ids) or (grammar is not None and grammar.terminated):
            update.finish_reason = "stop"
        elif token in p.stop_token_set:
            update.finish_reason, update.stop_reason = "stop", token
        elif grammar is not None and self.config.jump_forward:
            self._jump(seq, update)
        return self._end_update(seq, update)

    def _jump(self, seq: Sequence, update: SeqUpdate) -> None:
        """Append the tokens the grammar forces: the next step computes them as one chunk, then samples."""
        max_len = self.config.max_model_len or 0
        room = min(seq.params.max_tokens - (seq.num_output_tokens - seq.num_pending), max_len - seq.num_tokens)
        forced = seq.grammar.jump_forward(room, seq.params.stop_token_set)
        seq.token_ids.extend(forced)
        update.new_token_ids += forced
        if update.new_logprobs is not None:  # the grammar allows nothing else: probability 1
            update.new_logprobs += [TokenLogprob(t, 0.0, {t: 0.0}) for t in forced]
        self.jump_forward_tokens += len(forced)

    def _end_update(self, seq: Sequence, update: SeqUpdate) -> SeqUpdate:
        self.kv.cache_full_blocks(seq)
        max_len = self.config.max_model_len or 0
        if update.finish_reason is None and (
            seq.num_output_tokens - seq.num_pending >= seq.params.max_tokens or seq.num_known_tokens >= max_len
        ):
            update.finish_reason = "length"
        if update.finish_reason is not None:
            self._finish(seq, update.finish_reason)
        return update

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        self.scheduler.remove(seq)

    def _fail(self, request: Request, exc: BaseException) -> CoreOutput:
        """End a request that an error in its own processing broke; the engine carries on."""
        log.error("request %s failed: %s: %s", request.request_id, type(exc).__name__, exc, exc_info=exc)
        request.error = f"{type(exc).__name__}: {exc}"
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "error")
        return self._pop(request, [])

    def _update(self, request: Request, seqs: list[SeqUpdate]) -> CoreOutput:
        m = request.metrics
        return CoreOutput(request.request_id, seqs, request.finished, m.first_scheduled_time, m.num_cached_tokens,
                          m.num_preemptions, request.error)

    def _pop(self, request: Request, seqs: list[SeqUpdate]) -> CoreOutput:
        self.requests.pop(request.request_id, None)
        return self._update(request, seqs)

