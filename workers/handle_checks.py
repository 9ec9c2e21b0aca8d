"""What a generation worker checks of a KV handle it is given, and the status each failure gets.

Before the READ: the handle fits the request (a first token, READ mode, as many tokens and blocks
as the prompt). After it: the owner confirms, by ending the lease (Release), that the lease was
still live, so the blocks were pinned while they were read. A READ is one-sided: the owner cannot
refuse it, and a handle that was never issued, already released or read (a replay), or that names
other blocks than its lease would otherwise read whatever those blocks hold now.
"""
from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from tandem.kvtransfer.leases import KVHandle, StaleHandleError, TransferMode, UnknownHandleError
from tandem.kvtransfer.transfer_types import StalePeerError, TransferError
from tandem.workers.errors import InvalidRequestError, LeaseExpiredError, PeerUnavailableError
from tandem.workers.kv_blocks import blocks_for_tokens
from tandem.workers.peers import PeerClients

logger = logging.getLogger(__name__)


def check_handle_request(handle: KVHandle, first_token_id: int | None, request_id: str) -> None:
    """What a Generate with a handle needs before anything else: InvalidRequestError if not."""
    if first_token_id is None:
        raise InvalidRequestError(
            "a kv_handle needs the first_token_id its Prefill returned", field="first_token_id", request_id=request_id
        )
    if handle.mode is not TransferMode.READ:
        raise InvalidRequestError(
            "only READ handles are served (push is not built yet)", field="kv_handle", request_id=request_id
        )


def check_handle_fits(handle: KVHandle, num_prompt_tokens: int, block_size: int, request_id: str) -> None:
    """The handle holds the prompt's KV: as many tokens, and the blocks they fill."""
    expected_blocks = blocks_for_tokens(num_prompt_tokens, block_size)
    if handle.num_tokens != num_prompt_tokens or len(handle.block_ids) != expected_blocks:
        raise InvalidRequestError(
            f"kv_handle holds {handle.num_tokens} tokens in {len(handle.block_ids)} blocks; the prompt has"
            f" {num_prompt_tokens} tokens ({expected_blocks} blocks)",
            field="kv_handle",
            request_id=request_id,
        )


def raise_peer_failure(handle: KVHandle, error: Exception, request_id: str) -> NoReturn:
    """Raise the precise error for a failure to pair with or READ from the handle's owner: the
    owner's epoch moved on (FAILED_PRECONDITION), block or staging ids it does not have
    (INVALID_ARGUMENT), any other transfer failure (UNAVAILABLE, retriable); else error itself."""
    where = f"worker {handle.worker_id!r} ({handle.address})"
    if isinstance(error, StalePeerError):
        message = f"request {request_id}: handle {handle.handle_id} is of an epoch {where} has left: {error}"
        raise StaleHandleError(message) from error
    if isinstance(error, TransferError):
        raise PeerUnavailableError(f"KV transfer from {where} failed: {error}") from error
    if isinstance(error, ValueError):  # read_blocks refused the ids before anything moved
        message = f"kv_handle {handle.handle_id}: {error}"
        raise InvalidRequestError(message, field="kv_handle", request_id=request_id) from error
    raise error


async def confirm_lease(peers: PeerClients, handle: KVHandle, timeout: float, request_id: str, *, read: bool) -> None:
    """End the handle's lease at its owner and make sure it had not ended before. Raises
    UnknownHandleError (never issued: NOT_FOUND), StaleHandleError (another worker or epoch),
    InvalidRequestError (not the lease's blocks), LeaseExpiredError (released, read or expired
    already: its blocks may hold another prompt now), PeerUnavailableError (the owner did not
    answer) unless nothing was read: then every block was cached here, and the lease ends with
    its owner or at its deadline."""
    try:
        released = await peers.release(handle, timeout)
    except PeerUnavailableError as error:
        refusal = _owner_refusal(error.__cause__, request_id)
        if refusal is not None:
            raise refusal from error
        if read:
            raise
        logger.warning("could not release %s at %s (its lease will expire): %s",
                       handle.handle_id, handle.address, error)
        return
    if not released:
        raise LeaseExpiredError(
            f"request {request_id}: the lease of handle {handle.handle_id} had already ended at {handle.address}"
            " (released, read by another request, or expired): its blocks may hold another prompt; prefill again"
        )


def _owner_refusal(cause: BaseException | None, request_id: str) -> Exception | None:
    """The owner's own answer to the Release, when it refused the handle itself."""
    if not isinstance(cause, grpc.aio.AioRpcError):
        return None
    message = f"request {request_id}: the handle's owner says: {cause.details()}"
    if cause.code() == grpc.StatusCode.NOT_FOUND:
        return UnknownHandleError(message)
    if cause.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return StaleHandleError(message)
    if cause.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message, field="kv_handle")
    return None
