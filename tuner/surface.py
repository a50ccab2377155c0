"""A response surface: every configuration of a grid with what it measured, for replaying searches offline.

bench/tuner_surface.py records one on a GPU; `synthetic_surface` builds a stand-in with the same shape
(Llama-3.1-8B on one 80 GB GPU, 1024-token prompts, 256-token outputs) from a simple performance model,
so the replay can be tested without one. The synthetic figures are a model, not measurements.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Status = Literal["ok", "slo_unmet", "infeasible"]


class SurfacePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: dict[str, float | int]
    status: Status
    goodput_per_gpu: float = Field(default=0.0, ge=0)
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    note: str = ""


class Surface(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str
    source: Literal["measured", "synthetic"]
    grid: dict[str, list[float | int]] = Field(description="knob -> its grid values, ascending")
    points: list[SurfacePoint]
    slo: dict[str, float | None] = Field(default_factory=dict)
    default_params: dict[str, float | int] | None = Field(default=None, description="the engine's defaults")
    provenance: dict[str, Any] | None = Field(default=None, description="device, commit, date of a measured one")

    @model_validator(mode="after")
    def _complete(self) -> Surface:
        want = math.prod(len(v) for v in self.grid.values())
        keys = {self.key(p.params) for p in self.points}
        if len(keys) != want or len(self.points) != want:
            raise ValueError(f"the surface must hold each of the {want} grid points exactly once "
                             f"(has {len(self.points)} points, {len(keys)} distinct)")
        return self

    def key(self, params: dict[str, float | int]) -> tuple[float, ...]:
        return tuple(float(params[k]) for k in self.grid)

    def lookup(self) -> dict[tuple[float, ...], SurfacePoint]:
        return {self.key(p.params): p for p in self.points}

    def optimum(self) -> SurfacePoint:
        ok = [p for p in self.points if p.status == "ok"]
        if not ok:
            raise ValueError("no grid point meets the SLO: nothing to find")
        return max(ok, key=lambda p: p.goodput_per_gpu)

    def grid_order(self) -> list[SurfacePoint]:
        """The order a nested-loop grid search (vLLM's auto_tune) visits the points."""
        table = self.lookup()
        return [table[tuple(float(v) for v in combo)] for combo in itertools.product(*self.grid.values())]


def _h100_llama8b(gmu: float, seqs: int, chunk: int, itl_slo_ms: float, ttft_slo_ms: float,
                  noise: float) -> SurfacePoint:
    """Steady state of continuous batching with chunked prefill, 4 prompt tokens per generated token.

    Concurrency is capped by max_num_seqs, by the KV pool, by the prefill budget (a step must prefill
    4 tokens per running sequence, at most `chunk`) and by the ITL SLO (a full chunk in one step is the
    p95 step); bigger chunks mean fewer TTFT steps but longer ITL spikes and more activation memory.
    """
    params: dict[str, float | int] = {"gpu_memory_utilization": gmu, "max_num_seqs": seqs,
                                      "max_num_batched_tokens": chunk}
    weights_gb, kv_per_token_mb, resident_tokens = 16.1, 0.125, 1024 + 128
    activations_gb = 0.5 + 24.0 * chunk / 32768 + 0.02 * seqs  # prefill activations, CUDA graphs, sampler
    kv_gb = 80 * gmu - weights_gb - activations_gb - 4.0  # 4 GB: context and allocator slack
    if kv_gb < 2.0:
        return SurfacePoint(params=params, status="infeasible", note=f"out of memory: {kv_gb:.1f} GB left for KV")
    kv_seqs = kv_gb * 1024 / kv_per_token_mb / resident_tokens
    spike_ms = 0.03 * min(chunk, 4096)
    itl_cap = (itl_slo_ms - 7.0 - spike_ms) / 0.045
    conc = min(seqs, kv_seqs, chunk / 4, itl_cap)
    if conc < 1:
        return SurfacePoint(params=params, status="slo_unmet", itl_p95_ms=round(7.0 + spike_ms, 1),
                            note="one prefill chunk alone breaks the ITL SLO")
    itl_p95 = 7.0 + 0.045 * conc + spike_ms
    ttft_p95 = math.ceil(1024 / chunk) * itl_p95 * 1.3 + 30.0
    if ttft_p95 > ttft_slo_ms:
        return SurfacePoint(params=params, status="slo_unmet", ttft_p95_ms=round(ttft_p95, 1),
                            itl_p95_ms=round(itl_p95, 1), note="prefill in too many chunks for the TTFT SLO")
    preempt = 0.15 * max(0.0, seqs / kv_seqs - 1.0)
    step_ms = 7.0 + 0.045 * conc + 0.03 * 4 * conc
    goodput = conc * 1000 / step_ms * (1 - min(0.5, preempt)) * noise
    return SurfacePoint(params=params, status="ok", goodput_per_gpu=round(goodput, 1), ttft_p95_ms=round(ttft_p95, 1),
                        itl_p95_ms=round(itl_p95, 1))


def synthetic_surface(seed: int = 0, ttft_slo_ms: float = 500.0, itl_slo_ms: float = 100.0) -> Surface:
    """6 x 8 x 8 = 384 points over issue 6's GPU space with 2% measurement noise (fixed per seed)."""
    rng = random.Random(seed)
    grid: dict[str, list[float | int]] = {
        "gpu_memory_utilization": [0.70, 0.75, 0.80, 0.85, 0.90, 0.95],
        "max_num_seqs": [8, 16, 32, 64, 128, 256, 512, 1024],
        "max_num_batched_tokens": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
    }
    points = [
        _h100_llama8b(g, int(s), int(c), itl_slo_ms, ttft_slo_ms, math.exp(rng.gauss(0, 0.02)))
        for g, s, c in itertools.product(*grid.values())
    ]
    return Surface(description="synthetic: Llama-3.1-8B shape on one 80 GB GPU, 1024-in/256-out (a model, "
                   "not measurements)", source="synthetic", grid=grid, points=points,
                   slo={"ttft_p95_ms": ttft_slo_ms, "itl_p95_ms": itl_slo_ms},
                   default_params={"gpu_memory_utilization": 0.90, "max_num_seqs": 256, "max_num_batched_tokens": 8192})
