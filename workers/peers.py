"""gRPC calls one worker makes to another: fetch transfer metadata, release a handle.

Channels are cached per address; every call has a deadline and any failure becomes a
PeerUnavailableError that names the peer, so a dead context worker fails the one request that
needed it, fast, and nothing else.
"""
from __future__ import annotations

import grpc

from tandem.kvtransfer.leases import KVHandle, StaleHandleError
from tandem.kvtransfer.transfer_types import PeerMetadata
from tandem.proto import tandem_pb2, tandem_pb2_grpc
from tandem.workers.cluster_auth import ClusterAuth
from tandem.workers.errors import PairingError, PeerUnavailableError
from tandem.workers.pairing import PairingInfo
from tandem.workers.wire import handle_to_proto


class PeerClients:
    def __init__(self, auth: ClusterAuth = ClusterAuth()) -> None:
        self._auth = auth  # peers are cluster members: they want our token and certificate too
        self._stubs: dict[str, tuple[grpc.aio.Channel, tandem_pb2_grpc.WorkerStub]] = {}

    def _stub(self, address: str) -> tandem_pb2_grpc.WorkerStub:
        if address not in self._stubs:
            channel = self._auth.channel(address)
            self._stubs[address] = (channel, tandem_pb2_grpc.WorkerStub(channel))
        return self._stubs[address][1]

    async def transfer_metadata(self, address: str, timeout: float) -> tandem_pb2.TransferMetadata:
        try:
            return await self._stub(address).GetTransferMetadata(tandem_pb2.TransferMetadataRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise PeerUnavailableError(
                f"cannot fetch transfer metadata from {address}: {error.code().name} {error.details()}"
            ) from error

    async def paired_peer(self, handle: KVHandle, pairing: PairingInfo, reader_id: str, timeout: float) -> PeerMetadata:
        """The handle owner's transfer metadata, once checked: the owner is still at the handle's
        epoch (else StaleHandleError) and its KV means what ours means (else PairingError)."""
        meta = await self.transfer_metadata(handle.address, timeout)
        if meta.worker_id != handle.worker_id or meta.epoch != handle.epoch:
            raise StaleHandleError(
                f"handle {handle.handle_id} names worker {handle.worker_id!r} epoch {handle.epoch}, but"
                f" {handle.address} is worker {meta.worker_id!r} epoch {meta.epoch}: it restarted, the blocks are gone"
            )
        theirs = PairingInfo(
            model=meta.model, block_size=meta.block_size, kv_dtype=meta.kv_dtype, num_layers=meta.num_layers,
            num_kv_heads=meta.num_kv_heads, head_dim=meta.head_dim, kv_layout=meta.kv_layout,
        )
        if differences := pairing.mismatches(theirs):
            raise PairingError(f"worker {reader_id!r} cannot read KV from {meta.worker_id!r}: " + "; ".join(differences))
        return PeerMetadata(
            worker_id=meta.worker_id, epoch=meta.epoch, agent_name=meta.agent_name,
            agent_metadata=meta.agent_metadata, base_address=meta.base_address,
            bytes_per_block=meta.bytes_per_block, num_blocks=meta.num_blocks,
            memory_type=meta.memory_type, device_id=meta.device_id,
            staging_address=meta.staging_address, staging_slots=meta.staging_slots,
        )

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
