"""Iteration-level scheduling: who computes how many tokens in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, in arrival order, each taking what it still needs (one token when
decoding, a chunk when prefilling), so decodes and prefill chunks share a step. Waiting
sequences are admitted first-come first-served with what budget is left. While other requests
wait, no request holds more than `max_request_share` of the sequence slots or of a step's tokens,
so an `n=128` request or a huge prompt cannot starve a small request behind it. When the KV pool runs
dry, the most recently admitted running sequence is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already produced, so its output is unchanged.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvpilot.engine.config import EngineConfig
from kvpilot.engine.kv_cache import KVCacheManager
from kvpilot.engine.request import SeqStatus, Sequence


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len or 0
        self.seq_share = max(1, int(config.max_num_seqs * config.max_request_share))
        self.token_share = max(kv.block_size, int(config.max_num_batched_tokens * config.max_request_share))
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free_seq(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if len(self.running) >= self.max_num_seqs and self.waiting:
            self._yield_slots()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._sampled_last(seq):
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n > self.token_share and self._others_waiting(seq):
                n = self.token_share
            while not self.kv.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self.kv.allocate(seq, n)
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        now = time.monotonic()
        in_flight = self._prefix_blocks_in_flight()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.parent
            if (
                parent is not None
                and parent.status is SeqStatus.RUNNING
                and (parent.num_computed_tokens < parent.num_prompt_tokens)
            ):
                deferred.append(self.waiting.popleft())  # it waits for its parent's prompt, to share its blocks
                continue
            if self._over_share(seq):
                deferred.append(self.waiting.popleft())  # others wait: this request holds its share already
                continue
            shared = self._shareable(seq)
            if not seq.wants_prompt_logprobs and self._next_block_in_flight(seq, len(shared), in_flight):
                deferred.append(self.waiting.popleft())  # its prefix is being computed: share it next step
                continue
            cached_tokens = len(shared) * self.kv.block_size
            n = min(seq.num_tokens - cached_tokens, budget)
            if n > self.token_share and self._others_waiting(seq):
                n = self.token_share
            if not self.kv.can_allocate(seq, n, shared):
                break
            self.waiting.popleft()
            self.kv.record_lookup(seq.num_tokens, cached_tokens)
            self.kv.share(seq, shared)
            self.kv.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
            metrics = seq.request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.num_cached_tokens = cached_tokens
            if self.kv.enable_prefix_caching:
                in_flight.update(self._uncomputed_prompt_blocks(seq))
        self.waiting.extendleft(reversed(deferred))

    def _sampled_last(self, seq: Sequence) -> bool:
        """Its final token is sampled and on its way back (async scheduling): it will finish by length. A
        prompt-only request (max_tokens 0) is done once its prompt is computed."""
        if seq.params.max_tokens == 0:
            return seq.num_computed_tokens >= seq.num_tokens
        return seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _yield_slots(self) -> None:
        """Every slot is taken and someone waits: a request over its share gives back its newest samples.

        They are recomputed later, mostly from the prefix cache (their prompt blocks stay cached).
        """
        hogs = {id(s.request): s.request for s in self.running if len(s.request.seqs) > self.seq_share}
        for request in hogs.values():
            mine = [s for s in self.running if s.request is request]
            if len(mine) <= self.seq_share or not self._others_waiting(mine[0]):
                continue
            for victim in mine[self.seq_share :]:
                self.running.remove(victim)
                self._preempt(victim)

    def _others_waiting(self, seq: Sequence) -> bool:
        return any(other.request is not seq.request for other in self.waiting)

    def _over_share(self, seq: Sequence) -> bool:
        """Whether the request already runs its share of sequence slots while another request waits."""
        request = seq.request
        if len(request.seqs) <= self.seq_share:
            return False
        running = sum(1 for s in request.seqs if s.status is SeqStatus.RUNNING)
        return running >= self.seq_share and self._others_waiting(seq)

    def _uncomputed_prompt_blocks(self, seq: Sequence) -> list[int]:
        bs = self.kv.block_size
        return [self.kv.block_hash(seq, i) for i in range(seq.num_computed_tokens // bs, seq.num_prompt_tokens // bs)]

    def _prefix_blocks_in_flight(self) -> set[int]:
        """Hashes of full prompt blocks that running sequences have yet to compute."""
        if not self.kv.enable_prefix_caching:
            return set()
        return {h for seq in self.running for h in self._uncomputed_prompt_blocks(seq)}

    def _next_block_in_flight(self, seq: Sequence, num_shared: int, in_flight: set[int]) -> bool:
        """Whether the first block this sequence would compute is already being computed by another.

        Admitting it now would compute the same prefix twice; a step or two later it is a cache hit
        (the cache-aware admission SGLang's scheduler is known for).
        """
        if not in_flight or num_shared >= (seq.num_tokens - 1) // self.kv.block_size:
            return False
        return self.kv.block_hash(seq, num_shared) in in_flight

    def _shareable(self, seq: Sequence) -> list[int]:
        """Blocks the sequence can adopt: its parent's computed prompt blocks, else prefix-cache hits. None for
        a request that owes prompt logprobs: they come from computing the prompt (others keep their hits)."""
        if seq.wants_prompt_logprobs:
            return []
        parent = seq.parent
        cached = self.kv.find_cached_prefix(seq)
        if parent is None or parent.status is not SeqStatus.RUNNING or parent.num_released_blocks:
            return cached  # a parent past its window holds placeholders for its first blocks: use the cache
        full = min(parent.num_computed_tokens, seq.num_prompt_tokens, seq.num_tokens - 1) // self.kv.block_size
        inherited = parent.block_table[:full]
        return inherited if len(inherited) > len(cached) else cached

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
