"""The one error shape of every HTTP answer that is not a success, for every app of the project.

`{"error": code, "message": text, "errors": [{"field", "reason", "message"}, ...]}`: the
command API, the query routes and the framework's own refusals (malformed JSON, unknown
route, wrong method, a bug) all answer it, so a client and the OpenAPI document need one
error model. `install_error_handlers(app)` puts it on an app; routes raise `ApiError`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

_LOG = logging.getLogger("wallet.http")


class FieldError(BaseModel):
    field: str
    reason: str
    message: str


class ErrorReply(BaseModel):
    error: str
    message: str
    errors: list[FieldError] = []


class ApiError(Exception):
    """Raised by a route or a dependency: answered as `ErrorReply` with `status_code`."""

    def __init__(
        self,
        status_code: int,
        error: str,
        message: str,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error
        self.message = message
        self.errors = errors or []
        self.headers = headers


def error_response(
    status_code: int,
    error: str,
    message: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorReply(error=error, message=message, errors=errors or [])
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def field_error_response(status_code: int, error: str, message: str, field: str) -> JSONResponse:
    """An error about one named field (a path or query parameter)."""
    return error_response(status_code, error, message, [FieldError(field=field, reason=error, message=message)])


# pydantic's error types that deserve a plainer name for API clients.
_REASONS = {
    "missing": "missing",
    "extra_forbidden": "unknown_field",
    "string_type": "must_be_string",
    "bool_type": "must_be_boolean",
    "string_pattern_mismatch": "invalid_characters",
    "string_too_short": "too_short",
    "string_too_long": "too_long",
    "literal_error": "not_allowed",
    "model_attributes_type": "must_be_object",
    "dict_type": "must_be_object",
    "json_invalid": "malformed_json",
}
_ID_CHARACTERS = "must start with a letter or digit and contain only letters, digits and . _ : @ -"
_STATUS_ERRORS = {
    404: "not_found",
    405: "method_not_allowed",
    400: "bad_request",
    413: "body_too_large",
    415: "unsupported_media_type",
}


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        field = ".".join(location[1:]) if item["type"] != "json_invalid" and len(location) > 1 else location[0]
        reason = _REASONS.get(item["type"], item["type"])
        message = _ID_CHARACTERS if reason == "invalid_characters" else item["msg"]
        errors.append(FieldError(field=field or "body", reason=reason, message=message))
    summary = "; ".join(f"{item.field}: {item.message}" for item in errors)
    if any(item.reason == "malformed_json" for item in errors):
        return error_response(400, "malformed_json", f"the body is not valid JSON ({summary})", errors)
    return error_response(422, "invalid_request", summary, errors)


async def _api_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status_code, error.error, error.message, error.errors, error.headers)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = _STATUS_ERRORS.get(error.status_code, "http_error")
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
        error.status_code, str(error.detail)
    )
    headers = dict(error.headers) if error.headers else None
    if error.status_code == 405:
        # Starlette names the methods of the first route with this path only; a path served by
        # two routers (a command and a query, say) allows the methods of both.
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return error_response(error.status_code, code, message, headers=headers)


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    # Asked of every route through Starlette's public `matches`: included routers answer it too.
    routes = request.app.router.routes
    return [
        method
        for method in _HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    _LOG.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed on this request; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


# For the OpenAPI document: the statuses every route may answer with the error shape.
def error_responses(*status_codes: int) -> dict[int | str, dict]:
    descriptions = {
        400: "the body is not valid JSON",
        401: "no valid bearer token",
        403: "the token lacks the scope",
        404: "not found",
        413: "the body is larger than the limit",
        415: "the body is not sent as application/json",
        422: "a field or parameter is missing or invalid; `errors` names each",
        429: "too many requests from this principal; retry after `Retry-After` seconds",
        503: "a dependency (Kafka, the read model) is unavailable; retry",
    }
    return {code: {"model": ErrorReply, "description": descriptions.get(code, "error")} for code in status_codes}
