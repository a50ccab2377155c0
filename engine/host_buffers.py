"""Pinned host staging buffers for a step's inputs, so every host-to-device copy is truly asynchronous.

Two sets alternate: under async scheduling the host fills step N+1's inputs while step N's copies may still
be in flight, and by the time a set comes round again the step that used it has been collected. Buffers grow
on demand. On a CPU device arrays are wrapped as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from kvpilot.engine.input_batch import block_table_array

_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


class HostBuffers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self._current = 0

    def flip(self) -> None:
        self._current ^= 1

    def _buffer(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        buffers = self._sets[self._current]
        buf = buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            capacity = max(size, 2 * buf.numel() if buf is not None else 256)
            buf = buffers[name] = torch.empty(capacity, dtype=dtype, pin_memory=True)
        return buf

    def to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        if not self.pinned:
            return torch.from_numpy(array)
        buf = self._buffer(name, array.size, _TORCH_DTYPES[array.dtype])
        n = array.size
        buf.numpy()[:n] = array.reshape(-1)
        return buf[:n].view(array.shape).to(self.device, non_blocking=True)

    def table_to_device(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables as one [B, widest] int32 tensor, zero-padded."""
        if not self.pinned:
            return torch.from_numpy(block_table_array(tables))
        width = max(max((len(t) for t in tables), default=0), 1)
        buf = self._buffer("tables", max(len(tables), 1) * width, torch.int32)
        table = block_table_array(tables, buf.numpy())
        return buf[: table.size].view(table.shape).to(self.device, non_blocking=True)
