"""Tensor parallelism: the process group, the sharded layers' collectives, and how weights split.

Megatron-style: q/k/v and gate/up are split by output rows (heads, intermediate units) and need no
communication; o_proj and down_proj are split by input columns and their partial sums are all-reduced;
every expert of an MoE layer is split the same way along its intermediate units (the router is
replicated); the embedding and LM head are split by vocabulary rows. One process per GPU (gloo on CPU for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kvpilot.engine.models.arch import ModelArch
from torch import nn


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TPGroup()


def check_divisible(arch: ModelArch, size: int) -> None:
    """Heads, MLP units and each expert's units must split evenly; say which one does not."""
    dense = not all(arch.is_moe_layer(i) for i in range(arch.num_layers))
    for name, value in (
        ("num_attention_heads", arch.num_heads),
        ("num_key_value_heads", arch.num_kv_heads),
        ("intermediate_size", arch.intermediate_size if dense else 0),
        ("moe_intermediate_size", arch.moe_intermediate_size),
        ("shared_expert_intermediate_size", arch.shared_expert_intermediate_size),
    ):
        if value % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the model's {name} ({value})")


def init_process_group(rank: int, size: int, port: int, device_type: str) -> TPGroup:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=120))
    return TPGroup(rank, size)


def destroy_process_group() -> None:
    """Leave the group so another engine can form one; NCCL groups are left to process exit.

    Tearing down an NCCL communicator that CUDA graphs captured hangs (seen on 2xH200, torch 2.11),
    so on CUDA one tensor-parallel engine per process is the rule.
    """
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; rows of other ranks contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(nn.Module):
    """Vocabulary-sharded output projection; logits are gathered so sampling sees the whole vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // tp.size), hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last(F.linear(hidden, self.weight))
        return logits[:, : self.vocab_size]


def shard_rows(tensor: torch.Tensor, tp: TPGroup, rows_per_rank: int) -> torch.Tensor:
    """This rank's rows, zero-padded when the last shard is short (vocabulary sizes)."""
    part = tensor[tp.rank * rows_per_rank : (tp.rank + 1) * rows_per_rank]
    if part.shape[0] < rows_per_rank:
        part = torch.cat([part, part.new_zeros(rows_per_rank - part.shape[0], *part.shape[1:])])
    return part


def shard_cols(tensor: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    per = tensor.shape[1] // tp.size
    return tensor[:, tp.rank * per : (tp.rank + 1) * per]
