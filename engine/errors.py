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
