"""OpenAI-shaped errors of the orchestrator's HTTP API: the exception, its JSON body, and the
conversion of pydantic (or FastAPI) validation errors into a 400 naming the offending field.

Split from `openai_protocol.py` (which re-exports everything here) to keep each under 400 lines.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError


class ErrorType(str, enum.Enum):
    """OpenAI's `error.type`; the HTTP status travels beside it in `APIError.status`."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    NOT_FOUND = "not_found_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"


class APIError(Exception):
    """A failure reported to the client: HTTP status plus OpenAI's error object."""

    def __init__(
        self, status: int, type: ErrorType, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.param, self.code = status, type, message, param, code

    @classmethod
    def invalid_request(cls, message: str, *, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, ErrorType.INVALID_REQUEST, message, param=param, code=code)

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        message = f"The model `{model}` does not exist."
        return cls(404, ErrorType.NOT_FOUND, message, param="model", code="model_not_found")

    @classmethod
    def unauthorized(cls, message: str = "Invalid API key.") -> APIError:
        return cls(401, ErrorType.AUTHENTICATION, message, code="invalid_api_key")

    @classmethod
    def rate_limited(cls, message: str) -> APIError:
        return cls(429, ErrorType.RATE_LIMIT, message, code="rate_limit_exceeded")

    @classmethod
    def server_error(cls, message: str, *, status: int = 500) -> APIError:
        return cls(status, ErrorType.SERVER, message)

    @classmethod
    def body_too_large(cls, max_bytes: int) -> APIError:
        message = f"The request body is larger than this server's limit of {max_bytes} bytes."
        return cls(413, ErrorType.INVALID_REQUEST, message, code="request_too_large")

    @classmethod
    def body_timeout(cls, timeout_s: float) -> APIError:
        message = f"The request body did not arrive within {timeout_s:g} s."
        return cls(408, ErrorType.INVALID_REQUEST, message, code="request_timeout")

    @classmethod
    def client_closed(cls) -> APIError:
        """The client left before its request body arrived (499, as nginx logs it): nobody reads this."""
        message = "The client closed the connection before sending the whole request body."
        return cls(499, ErrorType.INVALID_REQUEST, message)

    @classmethod
    def unsupported_media_type(cls, content_type: str) -> APIError:
        message = f"Unsupported Content-Type {content_type!r}: send the request body as application/json."
        return cls(415, ErrorType.INVALID_REQUEST, message, code="unsupported_media_type")

    @classmethod
    def from_http_status(cls, status: int, detail: str) -> APIError:
        """The error of a route the app does not have (404) or a method it does not take (405)."""
        return cls(status, ErrorType.NOT_FOUND if status == 404 else ErrorType.INVALID_REQUEST, detail)


def error_body(err: APIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type.value, "param": err.param, "code": err.code}}


# Union branches show up in pydantic's error locations as tags: openai_protocol's discriminators
# tag theirs "str" and "list"; pydantic's own tags contain "[" ("list[int]", "function-after[...]").
_UNION_TAGS = {"str", "list"}


def api_error_from_validation(errors: ValidationError | Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 naming the first offending field, from pydantic's (or FastAPI's) error list."""
    first = (errors.errors(include_url=False) if isinstance(errors, ValidationError) else list(errors))[0]
    loc = list(first["loc"])
    if loc and loc[0] == "body":  # FastAPI's RequestValidationError prefixes the location
        loc = loc[1:]
    if first["type"] == "json_invalid":
        return APIError.invalid_request(f"We could not parse the JSON body of your request: {first['msg']}")
    path = [str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    param = ".".join(path) or None
    if param is None:
        return APIError.invalid_request(f"Invalid request body: {first['msg']}")
    if first["type"] == "missing":
        return APIError.invalid_request(f"Missing required parameter: '{param}'.", param=param)
    msg = str(first["msg"]).removeprefix("Value error, ")
    return APIError.invalid_request(f"Invalid value for '{param}': {msg}", param=param)
