"""Building a model runner on a device, and the worker processes that hold the other tensor-parallel shards.

Rank 0 lives in the engine process and schedules; ranks 1..N-1 are spawned processes that receive each
step's host-side inputs over a pipe and run the same forward, meeting rank 0 in the collectives. A worker
exits when told, when its pipe breaks, or when its parent dies, so none outlives the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import socket
from pathlib import Path
from typing import Any

import torch
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.model_runner import ModelRunner, StepInputs
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.loader import load_model
from kvpilot.engine.parallel import TPGroup, destroy_process_group, init_process_group
from kvpilot.engine.quant.fp8_linear import resolve_gemm
from kvpilot.engine.quant.fp8_scheme import read_fp8_scheme
from kvpilot.engine.quant.kv_scales import check_fp8_device, fp8_fields

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda and config.tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {config.tensor_parallel_size} needs that many GPUs; "
            f"{torch.cuda.device_count()} visible"
        )
    return torch.device("cuda", rank) if use_cuda else torch.device("cpu")


def resolve_dtype(config: EngineConfig, arch: ModelArch, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and rarely what a test wants
    dtype = _DTYPES.get(arch.torch_dtype, torch.bfloat16)
    return torch.bfloat16 if dtype == torch.float32 else dtype


def build_runner(config: EngineConfig, model_dir: Path, arch: ModelArch, tp: TPGroup) -> ModelRunner:
    device = resolve_device(config, tp.rank)
    fp8 = read_fp8_scheme(config.quantization, model_dir, arch)
    check_fp8_device(fp8_fields(config, fp8 is not None), device)
    gemm = "reference" if fp8 is None else resolve_gemm(config.fp8_gemm_backend, device, fp8.group is not None)
    torch.manual_seed(config.seed)
    model = load_model(
        model_dir,
        arch,
        dtype=resolve_dtype(config, arch, device),
        device=device,
        load_format=config.load_format,
        max_positions=config.max_model_len or arch.max_position_embeddings,
        seed=config.seed,
        tp=tp,
        fp8=fp8,
        fp8_gemm=gemm,
    )
    return ModelRunner(config, model, arch, tp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_main(rank: int, port: int, config: EngineConfig, model_dir: Path, arch: ModelArch, conn: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    device = resolve_device(config, rank)
    tp = init_process_group(rank, config.tensor_parallel_size, port, device.type)
    runner = build_runner(config, model_dir, arch, tp)
    parent = mp.parent_process()
    try:
        while True:
            if not conn.poll(1.0):
                if parent is not None and not parent.is_alive():
                    return
                continue
            try:
                inputs = conn.recv()
            except EOFError:
                return
            if inputs is None:
                return
            runner.run(inputs)
    finally:
        destroy_process_group()


class WorkerPool:
    """Ranks 1..N-1 as spawned processes; `send` hands each the step rank 0 is about to run."""

    def __init__(self, config: EngineConfig, model_dir: Path, arch: ModelArch) -> None:
        self.port = _free_port()
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for rank in range(1, config.tensor_parallel_size):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.port, config, model_dir, arch, recv),
                name=f"kvpilot-tp{rank}",
                daemon=True,
            )
            proc.start()
            self.conns.append(send)
            self.procs.append(proc)
        atexit.register(self.shutdown)

    def send(self, inputs: StepInputs) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel workers died: {dead}")
        for conn in self.conns:
            conn.send(inputs)

    def shutdown(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []


def start_tensor_parallel(config: EngineConfig, model_dir: Path, arch: ModelArch) -> tuple[WorkerPool, TPGroup]:
    """Spawn the other ranks, then join the process group as rank 0 (the group forms once all have joined)."""
    pool = WorkerPool(config, model_dir, arch)
    device = resolve_device(config, 0)
    log.info("tensor parallel: %d ranks (pid %d is rank 0)", config.tensor_parallel_size, os.getpid())
    return pool, init_process_group(0, config.tensor_parallel_size, pool.port, device.type)
