"""Turns a scheduled step into tensors, runs the model, and returns logits for the rows to sample.

It also owns the device-side state: the model, the KV cache tensors and the attention backend,
and sizes the KV pool (on CUDA from measured memory, on CPU from an explicit budget). An e4m3 pool
(kv_cache_dtype fp8) gets its per-head scales from the checkpoint or a calibration pass before it is sized.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.cuda_graphs import DecodeGraphs
from kvpilot.engine.host_buffers import HostBuffers
from kvpilot.engine.input_batch import StepInputs, StepRows, build_step_inputs
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.llama import CausalLM
from kvpilot.engine.models.moe import warm_up_experts
from kvpilot.engine.parallel import SINGLE, TPGroup
from kvpilot.engine.piecewise_graphs import PiecewiseGraphs
from kvpilot.engine.quant.kv_scales import assign_checkpoint_scales, calibrate, kv_cache_dtype
from kvpilot.engine.request import Sequence
from kvpilot.engine.sampler import PromptLogprobBatch, score_prompt
from kvpilot.kernels.fp8_math import is_fp8

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 * 1024**2
# The K/V calibration pass of an e4m3 pool without checkpoint scales: this many seeded random sequences.
CALIBRATION_SEQS, CALIBRATION_LEN = 4, 256
# Steps up to this many tokens replay piecewise graphs; beyond it the GPU, not kernel launches, is the limit.
MAX_PIECEWISE_TOKENS = 2048


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        try:
            from kvpilot.engine.attention.triton_backend import TritonAttentionBackend
        except ImportError as exc:
            if name == "triton":
                raise ValueError(f"attention_backend 'triton' is unavailable: {exc}") from exc
        else:
            return TritonAttentionBackend()
    from kvpilot.engine.attention.torch_ref import TorchAttentionBackend

    return TorchAttentionBackend()


class ModelRunner:
    def __init__(self, config: EngineConfig, model: CausalLM, arch: ModelArch, tp: TPGroup = SINGLE) -> None:
        self.config = config
        self.model = model
        self.arch = arch
        self.tp = tp
        self.max_model_len = max_model_len = config.max_model_len or arch.max_position_embeddings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = config.block_size
        self.backend = select_backend(config.attention_backend, self.device)
        self.buffers = HostBuffers(self.device)
        model.set_attention_backend(self.backend)
        self.kv_dtype = kv_cache_dtype(config, self.dtype)
        self.kv_scale_source = self._prepare_kv_scales() if is_fp8(self.kv_dtype) else None
        if self.kv_scale_source is None and model.checkpoint_kv_scales:
            log.info("the checkpoint's K/V cache scales are unused: kv_cache_dtype is %r", config.kv_cache_dtype)
        self.num_blocks = tp.min_int(self._size_kv_pool(), self.device)
        kv_heads = arch.num_kv_heads // tp.size
        shape = (arch.num_layers, self.num_blocks, self.block_size, kv_heads, arch.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(self.k_cache[i], self.v_cache[i]) for i in range(arch.num_layers)]
        if self.device.type == "cuda":  # eager steps above the piecewise buckets pick MoE tiles by token count
            warmed = warm_up_experts(model, config.max_num_batched_tokens)
            if warmed:
                log.info("fused MoE kernels compiled for %d tile configs", warmed)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager and self.backend.name == "triton":
            self.graphs = DecodeGraphs(
                model, self.kv_caches, self.backend, min(config.max_num_seqs, 512), max_model_len, self.block_size
            )
            self.graphs.capture()
        self.piecewise: PiecewiseGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.piecewise = PiecewiseGraphs(model, min(config.max_num_batched_tokens, MAX_PIECEWISE_TOKENS))
            self.piecewise.capture()
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s, %s backend); max concurrency at "
            "max_model_len %d: %.2f",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20,
            self.kv_description,
            self.backend.name,
            max_model_len,
            self.num_blocks * self.block_size / max_model_len,
        )

    @property
    def kv_description(self) -> str:
        if self.kv_scale_source is None:
            return str(self.kv_dtype).removeprefix("torch.")
        ratio = torch.finfo(self.dtype).bits // 8
        return (f"fp8 e4m3 with {self.kv_scale_source} per-head scales: {ratio}x the tokens per byte of a "
                f"{str(self.dtype).removeprefix('torch.')} pool")

    @property
    def block_bytes(self) -> int:
        per_rank = self.arch.kv_bytes_per_token // self.tp.size
        return per_rank * self.block_size * torch.finfo(self.kv_dtype).bits // 8

    def _prepare_kv_scales(self) -> str:
        """Per-head K/V scales for an e4m3 pool: the checkpoint's, else calibrated; returns which."""
        if self.model.checkpoint_kv_scales:
            assign_checkpoint_scales(self.model, self.model.checkpoint_kv_scales, self.tp)
            return "checkpoint"
        calibrate(self.model, self.backend, self._calibration_forward)
        return "calibrated"

    @torch.inference_mode()
    def _calibration_forward(self) -> None:
        """A cache-less forward over seeded random tokens (the same on every tensor-parallel rank)."""
        lengths = [min(self.max_model_len, CALIBRATION_LEN)] * CALIBRATION_SEQS
        gen = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(0, self.arch.vocab_size, (sum(lengths),), generator=gen).to(self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        meta = self._metadata(lengths, lengths, [], np.zeros(0, dtype=np.int64))
        self.model(ids, positions, [None] * self.arch.num_layers, meta)

    def _size_kv_pool(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            return self._size_from_gpu_memory()
        budget = self.config.kv_cache_memory_bytes
        num_blocks = (budget or CPU_DEFAULT_KV_BYTES) // self.block_bytes
        if budget is None:  # the default need not exceed what max_num_seqs full-length sequences use
            per_seq = -(-self.max_model_len // self.block_size)
            num_blocks = min(num_blocks, self.config.max_num_seqs * per_seq)
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no block of {self.block_bytes} bytes")
        return int(num_blocks)

    def _size_from_gpu_memory(self) -> int:
        """gpu_memory_utilization x device memory, minus what the process and others hold at peak."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        peak, current = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        available = total * self.config.gpu_memory_utilization - used - (peak - current)
        num_blocks = int(available // self.block_bytes)
        log.info(
            "GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> %.1f GiB for KV",
            total / 2**30,
            used / 2**30,
            (peak - current) / 2**30,
            max(available, 0) / 2**30,
        )
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache at gpu_memory_utilization={self.config.gpu_memory_utilization}:"
                " raise it or lower max_num_batched_tokens"
            )
        return num_blocks

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A forward at the full step budget, without a cache, to measure peak activation memory."""
        tokens = self.config.max_num_batched_tokens
        lengths = [min(self.max_model_len, tokens - done) for done in range(0, tokens, self.max_model_len)]
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        input_ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        meta = self._metadata(lengths, lengths, [], np.zeros(0, dtype=np.int64))
        hidden = self.model(input_ids, positions, [None] * self.arch.num_layers, meta)
        rows = min(self.config.max_num_seqs, tokens)
        self.model.compute_logits(hidden[:rows])

    def _metadata(
        self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], slots: np.ndarray
    ) -> AttentionMetadata:
        cu = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=cu[1:])
        num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        prefill_cu = None
        if 0 < num_decodes < len(query_lens):
            prefill_cu = self.buffers.to_device("prefill_cu", cu[num_decodes:] - cu[num_decodes])
        return AttentionMetadata(
            slot_mapping=self.buffers.to_device("slots", slots),
            cu_seqlens_q=self.buffers.to_device("cu", cu),
            seq_lens=self.buffers.to_device("seq_lens", np.asarray(seq_lens, dtype=np.int32)),
            block_tables=self.buffers.table_to_device(tables),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=num_decodes,
            prefill_cu_seqlens_q=prefill_cu,
        )

    def prepare(
        self, scheduled: list[tuple[Sequence, int]], prev_rows: dict[int, int] | None = None
    ) -> tuple[StepInputs, StepRows]:
        return build_step_inputs(scheduled, self.block_size, prev_rows or {})

    @torch.inference_mode()
    def run(
        self, inputs: StepInputs, prev_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PromptLogprobBatch | None]:
        """The forward of one step on this rank: logits [sampled rows, vocab] and, if the step has prompt rows,
        their logprobs (every rank computes both: the LM head gathers across ranks).

        Nothing here waits for the device: inputs go up through pinned buffers, and decode rows whose token
        is still on the GPU take it from `prev_tokens`, the previous step's samples.
        """
        self.buffers.flip()
        meta = self._metadata(inputs.query_lens, inputs.seq_lens, inputs.tables, inputs.slots)
        input_ids = self.buffers.to_device("ids", inputs.ids)
        pos_t = self.buffers.to_device("positions", inputs.positions)
        if inputs.subs_dst:
            if prev_tokens is None:
                raise RuntimeError("a step needs the previous step's samples, but none are on the device")
            dst = self.buffers.to_device("subs_dst", np.asarray(inputs.subs_dst, dtype=np.int64))
            src = self.buffers.to_device("subs_src", np.asarray(inputs.subs_src, dtype=np.int64))
            input_ids.index_copy_(0, dst, prev_tokens.index_select(0, src))
        if self.graphs is not None and meta.is_decode_only and len(inputs.query_lens) <= self.graphs.max_batch:
            hidden = self.graphs.run(input_ids, pos_t, meta.slot_mapping, meta.seq_lens, meta.block_tables)
        elif self.piecewise is not None and len(inputs.ids) <= self.piecewise.max_tokens:
            hidden = self.piecewise.run(input_ids, pos_t, self.kv_caches, meta)
        else:
            hidden = self.model(input_ids, pos_t, self.kv_caches, meta)
        prompt = None
        if inputs.prompt_rows:
            prompt = score_prompt(
                self.model.compute_logits, hidden,
                self.buffers.to_device("prompt_rows", np.asarray(inputs.prompt_rows, dtype=np.int64)),
                self.buffers.to_device("prompt_targets", np.asarray(inputs.prompt_targets, dtype=np.int64)),
                inputs.prompt_top_k, self.arch.vocab_size,
            )
        if len(inputs.sample_rows) == hidden.shape[0]:
            return self.model.compute_logits(hidden), prompt
        rows = self.buffers.to_device("rows", np.asarray(inputs.sample_rows, dtype=np.int64))
        return self.model.compute_logits(hidden[rows]), prompt
