"""One worker of the cluster: the engine in a role, with its KV leases, transfers and events.

Roles share the one engine. A **context** worker serves Prefill: it runs the prompt, samples the
first token and keeps the prompt's blocks pinned under a lease, returned as a KVHandle. A
**generation** worker serves Generate: given a handle it reserves blocks (reusing any prefix it
holds), READs only the missing blocks from the handle's owner over NIXL, has the owner confirm
(Release) that the lease held throughout, and decodes; without a handle it prefills locally. An
**aggregated** worker does both. A request id is served by one call at a time.

Every wait is bounded: metadata fetches and releases by ``peer_timeout_s`` (a fetch also by the
lease's time left), a READ by the lease deadline (minus ``lease_margin_s``, so a lease cannot end
while its bytes are in flight) and by ``transfer_timeout_s``. On any failure, and when the caller
goes away at any point, the request's reserved blocks go back to the pool; blocks a cancelled READ
might still write are quarantined until NIXL reports the transfer over.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path

from tandem.kvtransfer.events import AllBlocksCleared
from tandem.kvtransfer.kv_event_stream import KVEventPublisher
from tandem.kvtransfer.leases import KVHandle, LeaseTable
from tandem.kvtransfer.nixl_transfer import TransferEngine, TransferError, TransferStats
from tandem.workers.engine import LLMEngine, RequestOutput
from tandem.workers.engine_loop import EngineLoop
from tandem.workers.errors import DrainingError, InvalidRequestError, LeaseExpiredError, StagingFullError, WrongRoleError
from tandem.workers.handle_checks import check_handle_fits, check_handle_request, confirm_lease, raise_peer_failure
from tandem.workers.pairing import PairingInfo
from tandem.workers.peers import PeerClients
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.sequence import FinishReason
from tandem.workers.worker_types import ModelInfo, PrefillResult, TransferReport, WorkerConfig

logger = logging.getLogger(__name__)

API_VERSION = 1
ACK_PREFIX = b"tandem-ack:"  # NIXL notification that ends a lease (readers now confirm by Release instead)


class Worker:
    """The asyncio face of one engine. Start with ``start()`` on the serving event loop."""

    def __init__(
        self,
        engine: LLMEngine,
        config: WorkerConfig,
        transfer: TransferEngine,
        publisher: KVEventPublisher | None = None,
        peers: PeerClients | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.transfer = transfer
        self.publisher = publisher
        spec = engine.kv_cache_spec
        self.pairing = PairingInfo(
            model=config.model,
            block_size=spec.block_size,
            kv_dtype=str(spec.dtype).removeprefix("torch."),
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads * engine.tensor_parallel_size,  # of the model: a wire block has them all
            head_dim=spec.head_dim,
        )
        self.leases = LeaseTable(
            config.worker_id, config.epoch, transfer.metadata().agent_name, config.address, config.lease_seconds
        )
        self.loop = EngineLoop(
            engine,
            hooks=[self._expire_leases, self._take_acknowledgements, self._reap_abandoned, self._flush_events],
            on_held_kv=self._grant_lease,
        )
        self.peers = peers or PeerClients()
        self.draining = False
        self.num_transferred_blocks = 0
        self.num_transferred_bytes = 0
        # request id -> the handle, or why none could be made; written on the engine thread
        self._granted: dict[str, KVHandle | StagingFullError] = {}
        self._transferring: dict[str, bool] = {}  # request id -> abort requested
        self._in_flight: set[str] = set()  # ids of the Prefill and Generate calls being served
        self._quarantined: dict[str, tuple[int, ...]] = {}  # transfer tag -> blocks a READ may still write
        self._executor = concurrent.futures.ThreadPoolExecutor(config.max_concurrent_transfers, "tandem-transfer")
        self._model_info: ModelInfo | None = None
        if publisher is not None:
            engine.pool.subscribe(publisher.sink)

    def start(self) -> None:
        if self.publisher is not None:
            # A fresh epoch starts empty: tell followers that whatever they knew of this worker is gone.
            self.publisher.publish([AllBlocksCleared()])
        self.loop.start(asyncio.get_running_loop())

    async def stop(self) -> None:
        self.loop.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.peers.close()

    # -- Prefill ------------------------------------------------------------------------------

    async def prefill(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> PrefillResult:
        """Run the prompt and sample its first token; the KV stays here under a lease."""
        self._admit("Prefill", self.config.role.serves_prefill, request_id)
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(partial(self.engine.add_request, request_id, list(prompt_token_ids), params, hand_off_kv=True))
            output = await stream.get()  # one output: the hand-off, or the end of the request
            handle = self._granted.pop(request_id, None)
            if isinstance(handle, StagingFullError):
                raise handle
            return PrefillResult(output, handle)
        except asyncio.CancelledError:
            self.loop.submit(partial(self._abort_on_engine, request_id))
            raise
        finally:
            self.loop.close_stream(request_id)
            self._in_flight.discard(request_id)

    def _grant_lease(self, output: RequestOutput) -> None:
        assert output.held_kv is not None
        held = output.held_kv
        staged_at = self.transfer.stage(held.block_ids)
        if staged_at is None and not self.transfer.reads_in_place:  # no peer could read these blocks
            self.engine.release_blocks(held.block_ids)
            self._granted[output.request_id] = StagingFullError(
                f"request {output.request_id}: no {len(held.block_ids)} free staging slots to hand its KV off from")
            return
        self._granted[output.request_id] = self.leases.grant(output.request_id, held.block_ids, held.num_tokens, staged_at)

    def _end_lease(self, handle: KVHandle) -> None:
        """Give back what a lease pinned: its blocks (to the prefix cache) and its staging slots."""
        self.engine.release_blocks(handle.block_ids)
        if handle.staging_offset is not None:
            self.transfer.unstage(handle.staging_offset, len(handle.block_ids))

    # -- Generate -----------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        handle: KVHandle | None = None,
        first_token_id: int | None = None,
    ) -> AsyncIterator[tuple[RequestOutput, TransferReport | None]]:
        """Decode; with a handle, fetch the prompt's KV first. Yields outputs until one is final."""
        self._admit("Generate", self.config.role.serves_generate, request_id)
        stream = self.loop.open_stream(request_id)
        finished = False
        try:
            report = None
            if handle is None:
                await self.loop.call(partial(self.engine.add_request, request_id, list(prompt_token_ids), params))
            else:
                report = await self._receive_kv(request_id, list(prompt_token_ids), params, handle, first_token_id)
                if report is None:  # aborted while the blocks were in flight
                    finished = True
                    yield _aborted_output(request_id, len(prompt_token_ids)), None
                    return
            while not finished:
                output = _merge_ready(await stream.get(), stream)
                finished = output.finished
                yield output, report
                report = None
        finally:
            self.loop.close_stream(request_id)
            self._in_flight.discard(request_id)
            if not finished:  # the caller went away: stop decoding for nobody
                self.loop.submit(partial(self._abort_on_engine, request_id))

    async def _receive_kv(
        self, request_id: str, prompt: list[int], params: SamplingParams, handle: KVHandle, first_token_id: int | None
    ) -> TransferReport | None:
        check_handle_request(handle, first_token_id, request_id)
        time_left = handle.lease_deadline - self.config.lease_margin_s - time.time()
        if time_left <= 0:
            raise LeaseExpiredError(f"request {request_id}: the lease of handle {handle.handle_id} has ended")
        deadline = time.monotonic() + min(time_left, self.config.transfer_timeout_s)
        # Before the size check: a peer with another block size fails here, saying so.
        await self._pair_with(handle, request_id, timeout=min(time_left, self.config.peer_timeout_s))
        check_handle_fits(handle, len(prompt), self.engine.pool.block_size, request_id)
        # Until committed (then a cancelled Generate's abort ends it) the reservation is known only
        # here: no engine-thread step that makes, commits or drops it may be lost to a cancellation.
        self._transferring[request_id] = False
        try:
            reservation = await self.loop.call_to_completion(
                partial(self.engine.reserve_prefilled, request_id, prompt, first_token_id, params),
                undo=lambda _: self.engine.cancel_prefilled(request_id),
            )
        except BaseException:
            del self._transferring[request_id]
            raise
        remote = handle.block_ids[reservation.num_cached_blocks :]
        local = reservation.blocks_to_fill
        staged_at = None if handle.staging_offset is None else handle.staging_offset + reservation.num_cached_blocks
        read = asyncio.get_running_loop().run_in_executor(
            self._executor,
            partial(
                self.transfer.read_blocks, handle.worker_id, handle.epoch, remote, local,
                deadline=deadline, tag=request_id, remote_staged_at=staged_at,
            ),
        ) if local else None
        try:
            stats = await asyncio.shield(read) if read is not None else TransferStats(0, 0, 0, 0.0)
        except asyncio.CancelledError:
            # The READ goes on in its thread: the blocks are given back once it has ended.
            assert read is not None
            read.add_done_callback(lambda done: self.loop.submit(partial(self._end_reservation, request_id, done)))
            raise
        except Exception as error:
            await self.loop.call_to_completion(partial(self._end_reservation, request_id, read))
            raise_peer_failure(handle, error, request_id)
        try:  # the owner ends the lease, saying whether it still held: else the bytes may be another prompt's
            await confirm_lease(self.peers, handle, self.config.peer_timeout_s, request_id, read=read is not None)
        except BaseException:
            self.loop.submit(partial(self._end_reservation, request_id, None))
            raise
        if self._transferring.pop(request_id):  # aborted while the blocks were in flight
            await self.loop.call_to_completion(partial(self.engine.cancel_prefilled, request_id))
            return None
        await self.loop.call_to_completion(partial(self._commit, request_id, stats))
        return TransferReport(len(local), reservation.num_cached_blocks, stats, reservation.block_ids)

    async def _pair_with(self, handle: KVHandle, request_id: str, timeout: float) -> None:
        """Make sure the handle's owner is a known, compatible NIXL peer of its current epoch."""
        if not self.transfer.has_peer(handle.worker_id, handle.epoch):
            peer = await self.peers.paired_peer(handle, self.pairing, self.config.worker_id, timeout)
            try:
                self.transfer.add_peer(peer)
            except TransferError as error:  # NIXL could not connect, or a newer epoch came first
                raise_peer_failure(handle, error, request_id)

    # engine-thread halves of _receive_kv

    def _commit(self, request_id: str, stats: TransferStats) -> None:
        self.engine.commit_prefilled(request_id)
        self.num_transferred_blocks += stats.num_blocks
        self.num_transferred_bytes += stats.num_bytes

    def _end_reservation(self, request_id: str, read: asyncio.Future | None) -> None:
        """Drop a reservation whose READ failed or was abandoned: free its blocks, or quarantine
        them when the READ might still land in them."""
        self._transferring.pop(request_id, None)
        error = read.exception() if read is not None and not read.cancelled() else None
        reusable = not isinstance(error, TransferError) or error.local_blocks_reusable
        kept = self.engine.cancel_prefilled(request_id, free_blocks=reusable)
        if kept:
            self._quarantined[request_id] = kept

    # -- Release, Abort, Drain, Stats -----------------------------------------------------------

    async def release(self, handle: KVHandle) -> bool:
        """Unpin a handle's blocks; False when its lease had already ended."""
        return await self.loop.call_to_completion(partial(self._release_on_engine, handle))

    def _release_on_engine(self, handle: KVHandle) -> bool:
        ended = self.leases.release(handle)
        if ended is None:
            return False
        self._end_lease(ended)
        return True

    async def abort(self, request_id: str) -> bool:
        if request_id in self._transferring:
            self._transferring[request_id] = True  # the transfer ends, bounded by its deadline, then frees
            return True
        return await self.loop.call(partial(self._abort_on_engine, request_id))

    def _abort_on_engine(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        self._granted.pop(request_id, None)
        for handle_id in self.leases.handles_of_request(request_id):
            ended = self.leases.end(handle_id)
            if ended is not None:
                self._end_lease(ended)
                found = True
        return found

    async def drain(self, poll_s: float = 0.02) -> int:
        """Stop taking work; return once no request runs and no lease is held (the caller's
        deadline bounds the wait). Returns how many requests were in flight when it began."""
        self.draining = True
        in_flight = len(self.engine.requests) + len(self._transferring)
        while (await self.loop.call(self._busy)) or self._transferring:
            await asyncio.sleep(poll_s)
        return in_flight

    def _busy(self) -> bool:
        return bool(self.engine.requests) or self.leases.num_active > 0

    async def stats(self) -> dict[str, int | bool | str]:
        return await self.loop.call(self._stats_on_engine)

    def _stats_on_engine(self) -> dict[str, int | bool | str]:
        scheduler = self.engine.scheduler
        return {
            "api_version": API_VERSION,
            "worker_id": self.config.worker_id,
            "epoch": self.config.epoch,
            "role": self.config.role.value,
            "draining": self.draining,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "num_transferring": len(self._transferring),
            "num_free_blocks": self.engine.pool.num_free_blocks,
            "num_total_blocks": self.engine.pool.num_blocks,
            "num_leases": self.leases.num_active,
            "num_leases_expired": self.leases.num_expired,
            "num_pinned_blocks": self.leases.num_pinned_blocks,
            "num_transferred_blocks": self.num_transferred_blocks,
            "num_transferred_bytes": self.num_transferred_bytes,
            "num_prompt_tokens_computed": self.engine.num_prompt_tokens_computed,
        }

    async def model_info(self) -> ModelInfo:
        """The served model and its tokenizer files, built once (on the engine thread, the
        tokenizer's only user)."""
        if self._model_info is None:
            self._model_info = await self.loop.call(self._model_info_on_engine)
        return self._model_info

    def _model_info_on_engine(self) -> ModelInfo:
        engine = self.engine
        files: dict[str, bytes] = {}
        if engine.tokenizer is not None:
            with tempfile.TemporaryDirectory() as folder:
                engine.tokenizer.save_pretrained(folder)
                files = {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
        return ModelInfo(
            model=self.config.model,
            max_model_len=engine.max_model_len,
            block_size=engine.kv_cache_spec.block_size,
            eos_token_ids=tuple(sorted(engine.eos_token_ids)),
            vocab_size=engine.vocab_size,
            tokenizer_files=files,
        )

    def _admit(self, call: str, role_serves_it: bool, request_id: str) -> None:
        """Refuse a call this worker does not take now; else count request_id in flight (the
        caller discards it when done: a second request under it would take the first's outputs)."""
        if not role_serves_it:
            raise WrongRoleError(f"worker {self.config.worker_id!r} has role {self.config.role.value}, which does not serve {call}")
        if self.draining:
            raise DrainingError(f"worker {self.config.worker_id!r} is draining and takes no new requests")
        if request_id in self._in_flight:
            message = "duplicate request id: one under it is in flight here"
            raise InvalidRequestError(message, field="request_id", request_id=request_id)
        self._in_flight.add(request_id)

    # -- housekeeping hooks, on the engine thread ----------------------------------------------

    def _expire_leases(self) -> None:
        for handle in self.leases.expire():
            logger.warning("KV lease %s (%d blocks) expired unacknowledged; blocks released", handle.handle_id, len(handle.block_ids))
            self._end_lease(handle)

    def _take_acknowledgements(self) -> None:
        for _agent, message in self.transfer.poll_notifications():
            if message.startswith(ACK_PREFIX):
                handle = self.leases.acknowledge(message[len(ACK_PREFIX) :].decode())
                if handle is not None:
                    self._end_lease(handle)

    def _reap_abandoned(self) -> None:
        if not self._quarantined:
            return
        for tag in self.transfer.reap_abandoned():
            block_ids = self._quarantined.pop(tag, None)
            if block_ids:
                self.engine.release_blocks(block_ids)

    def _flush_events(self) -> None:
        if self.publisher is not None:
            self.publisher.flush()


def _aborted_output(request_id: str, num_prompt_tokens: int) -> RequestOutput:
    return RequestOutput(request_id, (), "", (), FinishReason.ABORT, num_prompt_tokens, 0, 1)


def _merge_ready(output: RequestOutput, stream: asyncio.Queue[RequestOutput]) -> RequestOutput:
    """``output`` joined with the outputs already queued behind it: a reader that fell behind
    (a busy orchestrator, a slow client) gets one message for several steps, not a backlog of one
    message per token that keeps it behind."""
    while not output.finished and not stream.empty():
        later = stream.get_nowait()
        output = dataclasses.replace(
            later,
            new_token_ids=output.new_token_ids + later.new_token_ids,
            new_text=output.new_text + later.new_text,
            new_logprobs=output.new_logprobs + later.new_logprobs,
        )
    return output
