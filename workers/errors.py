"""Errors the engine raises to its callers. They name the request and the problem."""
from __future__ import annotations

# Loading errors come from models/; re-exported so callers above the engine need not reach down.
from tandem.models.errors import ModelLoadError

__all__ = [
    "DrainingError",
    "InvalidRequestError",
    "LeaseExpiredError",
    "ModelLoadError",
    "PairingError",
    "PeerUnavailableError",
    "WorkerError",
    "WrongRoleError",
]


class InvalidRequestError(ValueError):
    """The request cannot be served as given; the engine keeps serving everything else."""

    def __init__(self, message: str, *, field: str | None = None, request_id: str | None = None):
        self.field = field
        self.request_id = request_id
        where = f"request {request_id}: " if request_id else ""
        super().__init__(f"{where}{message}")


class WorkerError(Exception):
    """A worker-level refusal or failure. ``status`` is the gRPC status code name the server
    answers with; ``retriable`` tells a router whether the same request may succeed elsewhere."""

    status = "INTERNAL"
    retriable = False


class WrongRoleError(WorkerError):
    """The call is not one this worker's role serves (Prefill on a generation worker, ...)."""

    status = "FAILED_PRECONDITION"


class DrainingError(WorkerError):
    """The worker is draining and takes no new work."""

    status = "UNAVAILABLE"
    retriable = True


class PairingError(WorkerError):
    """Two workers cannot exchange KV: their model, block geometry or dtype differ."""

    status = "FAILED_PRECONDITION"


class LeaseExpiredError(WorkerError):
    """The KV handle's lease ran out (or would before a transfer could finish): prefill again."""

    status = "FAILED_PRECONDITION"
    retriable = True


class StagingFullError(WorkerError):
    """A tensor-parallel worker hands KV off through staging slots, and none were free: the
    prompt's blocks went back to the pool; the same request may succeed later or elsewhere."""

    status = "RESOURCE_EXHAUSTED"
    retriable = True


class PeerUnavailableError(WorkerError):
    """The worker holding the KV could not be reached or died during the transfer."""

    status = "UNAVAILABLE"
    retriable = True
