"""CUDA graphs for decode steps: one captured forward per bucketed batch size, replayed with new inputs.

A decode step of a large model is hundreds of small kernel launches; replaying a graph issues them
in one call, so batch-1 decode runs at memory speed instead of launch speed. Inputs live in static
buffers that each replay reads; a batch is padded up to the next captured size with rows that store
nothing (slot -1) and attend over one harmless cached token.
"""

from __future__ import annotations

import logging
import time

import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.engine.models.llama import CausalLM, KVCache

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32) if s <= max_batch]
    sizes += list(range(48, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        max_batch: int,
        max_model_len: int,
        block_size: int,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.max_model_len = max_model_len
        # Split-K divides the keys a decode reads: under a window in every layer, at most the window's.
        self.max_keys = min(max_model_len, model.arch.kv_window or max_model_len)
        dev = next(model.parameters()).device
        self.sizes = bucket_sizes(max_batch)
        width = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_batch, width), dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            cu_seqlens_q=self.cu_seqlens_q[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.max_model_len] * b,
        )

    def split_for(self, batch: int) -> int:
        """The split-K factor the graph for this batch size was captured with (so its kernel is compiled)."""
        from kvpilot.kernels.paged_decode_attention import default_num_splits

        size = next((s for s in self.sizes if s >= batch), self.sizes[-1])
        return default_num_splits(size, self.kv_caches[0][0].shape[2], self.max_keys, self.input_ids.device)

    def _pin_decode_splits(self, batch: int) -> None:
        """A graph bakes in its launch grid: fix split-K for the longest context this batch size may see."""
        if not hasattr(self.backend, "decode_num_splits"):
            return
        from kvpilot.kernels.paged_decode_attention import default_num_splits

        kv_heads = self.kv_caches[0][0].shape[2]
        splits = default_num_splits(batch, kv_heads, self.max_keys, self.input_ids.device)
        self.backend.decode_num_splits = splits

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._pin_decode_splits(b)
            args = (self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b))
            self.model(*args)  # warm-up: compile kernels, settle allocations outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(*args)
            pool = graph.pool()
            self.graphs[b] = graph
        if hasattr(self.backend, "decode_num_splits"):
            self.backend.decode_num_splits = None
            self.backend.split_for = self.split_for
        torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs (batch %s) in %.1fs",
            len(self.sizes),
            self.sizes,
            time.perf_counter() - start,
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; returns hidden states of the real rows."""
        n = input_ids.shape[0]
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if b > n:
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(1)
            self.block_tables[n:b, 0].fill_(0)
        self.graphs[b].replay()
        return self.outputs[b][:n]
