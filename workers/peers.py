"""gRPC calls one worker makes to another: fetch transfer metadata, release a handle.

Channels are cached per address; every call has a deadline and any failure becomes a
PeerUnavailableError that names the peer, so a dead context worker fails the one request that
needed it, fast, and nothing else.
"""
from __future__ import annotations

import grpc

from tandem.kvtransfer.leases import KVHandle
from tandem.proto import tandem_pb2, tandem_pb2_grpc
from tandem.workers.errors import PeerUnavailableError
from tandem.workers.wire import handle_to_proto


class PeerClients:
    def __init__(self) -> None:
        self._stubs: dict[str, tuple[grpc.aio.Channel, tandem_pb2_grpc.WorkerStub]] = {}

    def _stub(self, address: str) -> tandem_pb2_grpc.WorkerStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address)
            self._stubs[address] = (channel, tandem_pb2_grpc.WorkerStub(channel))
        return self._stubs[address][1]

    async def transfer_metadata(self, address: str, timeout: float) -> tandem_pb2.TransferMetadata:
        try:
            return await self._stub(address).GetTransferMetadata(tandem_pb2.TransferMetadataRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise PeerUnavailableError(
                f"cannot fetch transfer metadata from {address}: {error.code().name} {error.details()}"
            ) from error

    async def release(self, handle: KVHandle, timeout: float) -> bool:
        try:
            reply = await self._stub(handle.address).Release(
                tandem_pb2.ReleaseRequest(handle=handle_to_proto(handle)), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise PeerUnavailableError(
                f"cannot release handle {handle.handle_id} at {handle.address}: {error.code().name} {error.details()}"
            ) from error
        return reply.released

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
