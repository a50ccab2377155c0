"""The router's own answers in OpenAI's error shape (the engine's ErrorResponse model), as HTTP and as SSE."""

from __future__ import annotations

from aiohttp import web
from kvpilot.engine.server.protocol import ErrorDetail, ErrorResponse


class RouterError(Exception):
    """An answer the router gives itself: no engine had room in time, the queue is full, bad gateway."""

    def __init__(self, status: int, message: str, *, type: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, code=code))
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.Response(body=self.body.model_dump_json(), status=self.status, headers=headers,
                            content_type="application/json")

    def sse(self) -> bytes:
        """The event that ends a stream the router could not finish, then the stream's end."""
        return b"data: " + self.body.model_dump_json().encode() + b"\n\ndata: [DONE]\n\n"


def http_error(status: int, message: str) -> RouterError:
    kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}.get(
        status, "internal_error" if status >= 500 else "invalid_request_error")
    return RouterError(status, message, type=kind, code=str(status))
