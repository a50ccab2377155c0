"""The decoder forward pass for Llama, Mistral, Qwen2 and Qwen3, and for Mixtral, Qwen2-MoE and Qwen3-MoE
(whose routed layers take moe.py's block in place of the MLP), over a flat batch of tokens.

Tokens of every sequence in a step are concatenated (no padding); attention is the only place
that needs to know where one sequence ends, and it reads that from AttentionMetadata.
q/k/v and gate/up projections are fused into one matmul each; the loader splits HF weights into them.
A layer with a sliding window passes it to the attention backend, which attends within it.
The projections are built by `linear` (nn.Linear's signature), which quantization swaps for its own layer;
embeddings, norms, the LM head and the routed experts stay in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.layers import MLP, RMSNorm, RotaryEmbedding
from kvpilot.engine.models.moe import SparseMoE
from kvpilot.engine.parallel import SINGLE, ParallelLMHead, TPGroup, VocabParallelEmbedding
from torch import nn

KVCache = tuple[torch.Tensor, torch.Tensor] | None
Linear = Callable[..., nn.Module]  # (in_features, out_features, bias=...) -> a module computing x @ W.T (+ b)


class Attention(nn.Module):
    """Heads split across tensor-parallel ranks; o_proj's partial sums are all-reduced."""

    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, tp: TPGroup, linear: Linear,
                 window: int | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.window = window
        self.num_heads, self.num_kv_heads = arch.num_heads // tp.size, arch.num_kv_heads // tp.size
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.backend: AttentionBackend | None = None
        # Per-head scales of an e4m3 KV cache (the checkpoint's or calibrated); unread by any other cache.
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def project(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D], rotated: everything before the attention itself."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None and self.k_norm is not None else None
        return (*self.rotary(positions, q, k, norms), v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata) -> torch.Tensor:
        assert self.backend is not None, "the model runner sets the attention backend before any forward"
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        return self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale, self.window,
                                    (self.k_scale, self.v_scale))

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.o_proj(attn.reshape(attn.shape[0], self.q_size)))

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.output(self.attend(*self.project(positions, x), kv_cache, meta))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, tp: TPGroup, linear: Linear, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        window = arch.layer_windows[index] if arch.layer_windows else None
        self.self_attn = Attention(arch, rotary, tp, linear, window)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoE(arch, tp) if arch.is_moe_layer(index)
            else MLP(arch.hidden_size, arch.intermediate_size, tp, linear=linear)
        )

    def pre_attention(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm and q/k/v: (q, k, v, residual). With the post-attention half, all of a layer but attention."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward(hidden, residual)
        return (*self.self_attn.project(positions, hidden), residual)

    def post_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.post_attention_layernorm.add_forward(self.self_attn.output(attn), residual)
        return self.mlp(hidden), residual

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, residual = self.pre_attention(positions, hidden, residual)
        return self.post_attention(self.self_attn.attend(q, k, v, kv_cache, meta), residual)


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup, linear: Linear) -> None:
        super().__init__()
        rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, rotary, tp, linear, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm.add_forward(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Decoder plus LM head; logits are computed only for the rows that will be sampled."""

    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup = SINGLE, linear: Linear = nn.Linear) -> None:
        super().__init__()
        self.arch, self.tp = arch, tp
        self.model = DecoderModel(arch, max_positions, tp, linear)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)
        # The checkpoint's K/V cache scales, {layer: {"k": t, "v": t}}: the loader fills it, the runner reads it.
        self.checkpoint_kv_scales: dict[int, dict[str, torch.Tensor]] = {}
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
