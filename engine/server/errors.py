"""OpenAI's error shape, and the exception handlers that guarantee client input never yields a 5xx."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from kvpilot.engine.errors import EngineDead, EngineOverloaded, RequestFailed, RequestRejected
from kvpilot.engine.server.protocol import ErrorDetail, ErrorResponse, Unsupported
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the server answers with, already mapped to its HTTP status and OpenAI type."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.retry_after = retry_after

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        # ASCII-escaped: echoed client text (a model name) may hold lone surrogates UTF-8 cannot encode.
        return Response(json.dumps(self.body.model_dump()), status_code=self.status, headers=headers,
                        media_type="application/json")


def draining() -> APIError:
    return APIError(
        503,
        "the server is shutting down and takes no new requests; retry on another replica",
        type="service_unavailable",
        code="draining",
        retry_after=RETRY_AFTER_S,
    )


def from_engine(exc: Exception) -> APIError:
    """Map the engine's refusals to statuses: never fits -> 400, queue full -> 429, dead -> 503, and a failure
    of this request alone -> 500 (the engine serves on)."""
    if isinstance(exc, RequestRejected):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded"
                        if exc.param == "max_tokens" else None)
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), type="rate_limit_error", code="overloaded", retry_after=RETRY_AFTER_S)
    if isinstance(exc, EngineDead):
        return APIError(503, "the engine failed and this replica is restarting; retry on another",
                        type="service_unavailable", code="engine_dead", retry_after=RETRY_AFTER_S)
    if isinstance(exc, RequestFailed):
        return APIError(500, f"the engine failed while processing request {exc.request_id} (the server log has "
                        "the cause under that id); other requests are unaffected", type="internal_error",
                        code="request_failed")
    if isinstance(exc, Unsupported):
        return APIError(400, str(exc), param=exc.param, code="unsupported")
    raise TypeError(f"not an engine error: {exc!r}")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


def _field(loc: tuple[Any, ...]) -> str | None:
    """The field path of a pydantic error location, without the union-member tags pydantic inserts
    ("str", "list[int]", "constrained-str", "function-after[...]")."""
    named: list[str] = []
    for part in (str(p) for p in loc if p != "body"):
        if part in _TYPE_TAGS or not (part.isidentifier() or part.isdigit()):
            break
        named.append(part)
    return ".".join(named) or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first problem, naming its field; malformed JSON gets its own message."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    field = _field(tuple(first.get("loc", ())))
    if field is None and first.get("type") in {"missing", "model_attributes_type", "dict_type", "model_type"}:
        return APIError(400, "the request body must be a JSON object")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {field}", param=field)
    if first.get("type") == "missing" and field:
        return APIError(400, f"missing required field '{field}'", param=field)
    # A union field fails once per member: show what each member expected.
    messages = [str(e.get("msg", "invalid value")).removeprefix("Value error, ")
                for e in errors if _field(tuple(e.get("loc", ()))) == field]
    message = "; or ".join(dict.fromkeys(messages[:4]))
    return APIError(400, f"invalid value for '{field}': {message}" if field else message, param=field)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(Unsupported)
    async def _unsupported(_: Request, exc: Unsupported) -> Response:
        return from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> Response:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> Response:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="internal_error").response()


def aborted(drain_expired: bool) -> APIError:
    """A request the server itself aborted: say so explicitly rather than end the stream quietly."""
    if drain_expired:
        return APIError(503, "the server shut down before the request finished (drain timeout expired); "
                        "retry it", type="service_unavailable", code="drain_timeout", retry_after=RETRY_AFTER_S)
    return APIError(503, "the request was aborted by the server before it finished",
                    type="service_unavailable", code="aborted", retry_after=RETRY_AFTER_S)


def internal(exc: BaseException) -> APIError:
    """The client learns the kind of failure; the details stay in the server log."""
    return APIError(500, f"internal server error: {type(exc).__name__}", type="internal_error")
