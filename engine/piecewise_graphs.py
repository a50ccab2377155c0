"""CUDA graphs for steps that mix prefill chunks and decodes, cut at each attention.

Eager, a forward of an 8B model spends ~17 ms launching kernels (measured on an H200), longer than the GPU
needs for most mixed steps. So the forward is cut at each attention: segment 0 is the embedding and layer 0
up to its rotated q/k/v; segment i is layer i-1 after attention and layer i up to q/k/v; the last segment is
the last layer after attention and the final norm. Each segment is captured per token-count bucket and reads
and writes static buffers; attention runs eagerly in between, since its launch depends on the batch's
sequence lengths. A step of t tokens replays the smallest bucket holding t: the pad rows compute values that
nothing reads (attention, and so the KV cache, sees only the real rows).
"""

from __future__ import annotations

import logging
import time

import torch
from kvpilot.engine.attention.backend import AttentionMetadata
from kvpilot.engine.models.llama import CausalLM, KVCache

log = logging.getLogger(__name__)

_SIZES = (16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)


def bucket_sizes(max_tokens: int) -> list[int]:
    sizes = [s for s in _SIZES if s <= max_tokens]
    return sizes or [max_tokens]


class PiecewiseGraphs:
    def __init__(self, model: CausalLM, max_tokens: int) -> None:
        self.model = model
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        p = next(model.parameters())
        dev, dtype = p.device, p.dtype
        self.sizes = bucket_sizes(max_tokens)
        t = self.sizes[-1]
        hidden = model.arch.hidden_size
        self.ids = torch.zeros(t, dtype=torch.long, device=dev)
        self.positions = torch.zeros(t, dtype=torch.long, device=dev)
        self.q = torch.zeros((t, attn.num_heads, attn.head_dim), dtype=dtype, device=dev)
        self.k = torch.zeros((t, attn.num_kv_heads, attn.head_dim), dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros_like(self.q)
        self.residual = torch.zeros((t, hidden), dtype=dtype, device=dev)
        self.out = torch.zeros((t, hidden), dtype=dtype, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def _segment(self, i: int, t: int) -> None:
        """Segment i of a t-token step, from the static buffers to the static buffers."""
        if i == 0:
            hidden, residual = self.model.model.embed_tokens(self.ids[:t]), None
        else:
            hidden, residual = self.layers[i - 1].post_attention(self.attn[:t], self.residual[:t])
        if i < len(self.layers):
            q, k, v, residual = self.layers[i].pre_attention(self.positions[:t], hidden, residual)
            self.q[:t].copy_(q)
            self.k[:t].copy_(k)
            self.v[:t].copy_(v)
            self.residual[:t].copy_(residual)
        else:
            hidden, _ = self.model.model.norm.add_forward(hidden, residual)
            self.out[:t].copy_(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for t in reversed(self.sizes):  # largest first, so the smaller ones reuse its memory
            graphs = []
            for i in range(len(self.layers) + 1):
                self._segment(i, t)  # warm-up: kernels compiled, allocations settled outside the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._segment(i, t)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[t] = graphs
        torch.cuda.synchronize()
        log.info("captured %d piecewise CUDA graphs for mixed steps (%d segments x tokens %s) in %.1fs",
                 sum(map(len, self.graphs.values())), len(self.layers) + 1, self.sizes, time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
            meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of a step's t real tokens (t <= max_tokens)."""
        t = input_ids.shape[0]
        graphs = self.graphs[next(s for s in self.sizes if s >= t)]
        self.ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        for i, layer in enumerate(self.layers):
            graphs[i].replay()
            self.attn[:t].copy_(layer.self_attn.attend(self.q[:t], self.k[:t], self.v[:t], kv_caches[i], meta))
        graphs[-1].replay()
        return self.out[:t]

    def run_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                  meta: AttentionMetadata) -> torch.Tensor:
        """The same segments without graphs: what the CPU tests compare with the model's own forward."""
        t = input_ids.shape[0]
        self.ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        for i, layer in enumerate(self.layers):
            self._segment(i, t)
            self.attn[:t].copy_(layer.self_attn.attend(self.q[:t], self.k[:t], self.v[:t], kv_caches[i], meta))
        self._segment(len(self.layers), t)
        return self.out[:t]
