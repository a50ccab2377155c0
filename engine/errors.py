"""Errors the engine raises for requests it will not take: the server maps them to HTTP statuses."""

from __future__ import annotations


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long for the model or the KV pool).

    Raised at once on submission, never after waiting, so clients learn immediately.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloaded(RuntimeError):
    """The waiting queue is at its bound: the request was refused, not queued."""


class EngineDead(RuntimeError):
    """The engine loop has stopped (error or shutdown); no new requests are taken."""


class RequestFailed(RuntimeError):
    """Processing this one request failed inside the engine; the engine and other requests carry on."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} failed in the engine")
        self.request_id = request_id


_DEVICE_MARKERS = ("CUDA", "cuBLAS", "cuDNN", "NCCL", "device-side assert", "out of memory")


def is_engine_fault(exc: BaseException) -> bool:
    """Whether an error means the engine itself is broken (device fault, OOM, a lost worker), not a request.

    CUDA errors poison the context for every later launch, so they must take the pod out of service.
    """
    import torch

    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError | torch.AcceleratorError):
        return True
    if isinstance(exc, EOFError | BrokenPipeError | ConnectionError):  # a tensor-parallel worker is gone
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_MARKERS)
