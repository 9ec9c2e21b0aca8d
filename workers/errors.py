"""Errors the engine raises to its callers. They name the request and the problem."""
from __future__ import annotations

# Loading errors come from models/; re-exported so callers above the engine need not reach down.
from tandem.models.errors import ModelLoadError

__all__ = ["InvalidRequestError", "ModelLoadError"]


class InvalidRequestError(ValueError):
    """The request cannot be served as given; the engine keeps serving everything else."""

    def __init__(self, message: str, *, field: str | None = None, request_id: str | None = None):
        self.field = field
        self.request_id = request_id
        where = f"request {request_id}: " if request_id else ""
        super().__init__(f"{where}{message}")
