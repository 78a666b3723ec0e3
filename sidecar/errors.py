"""The sidecar's error answers: an HTTP status and vLLM's error object."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An answer other than success: an HTTP status and vLLM's error object."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


_KINDS = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError"}
_KINDS |= {413: "BadRequestError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}
_KINDS |= {504: "GatewayTimeoutError"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _KINDS.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(error_body(exc.status, exc.message, exc.param), status=exc.status)
