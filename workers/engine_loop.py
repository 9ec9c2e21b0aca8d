"""Drives one LLMEngine on its own thread, for asyncio servers.

The engine is not thread-safe, and neither is the state that must change together with it (the
block pool, KV leases). So one thread owns all of it: between two engine steps it runs the
functions callers submitted (add a request, reserve blocks, end a lease, read stats) and the
housekeeping hooks (lease expiry, NIXL notifications, KV-event flush), then steps the engine if it
has work. Callers on the event loop await results with ``call`` and receive each request's outputs
on an asyncio queue opened before the request is added, so no output can be missed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from tandem.workers.engine import LLMEngine, RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 0.005  # how long an idle loop waits for a command before running its hooks again


class EngineLoopStopped(RuntimeError):
    """The engine loop is not running; nothing was done."""


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        hooks: list[Callable[[], None]] | None = None,
        on_held_kv: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        self.engine = engine
        self.hooks = list(hooks or [])  # run on the engine thread every iteration
        # Runs on the engine thread for an output that hands KV off, before it is delivered, so
        # that the blocks are under a lease at once, whatever becomes of the caller.
        self.on_held_kv = on_held_kv
        self.num_steps = 0
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.1f s", timeout)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run fn on the engine thread between steps; its result or exception lands in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._stopping.is_set():
            future.set_exception(EngineLoopStopped("the engine loop has stopped"))
            return future
        self._commands.put((fn, future))  # type: ignore[arg-type]
        return future

    async def call(self, fn: Callable[[], T]) -> T:
        """fn's result. A caller cancelled while fn waits its turn cancels fn (it never runs); one
        cancelled while fn runs loses its result."""
        return await asyncio.wrap_future(self.submit(fn))

    async def call_to_completion(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """call(), except that fn runs even when the caller is cancelled meanwhile, before anything
        submitted later; its result then goes to ``undo``, if given, on the engine thread. For a
        state change that no one but the caller knows of (a reservation, its commit)."""
        future = self.submit(fn)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if undo is not None:
                self.submit(partial(_undo, future, undo))
            raise

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        """Where request_id's outputs will arrive; open it before adding the request."""
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self.engine.has_unfinished_requests())
            for hook in self.hooks:
                try:
                    hook()
                except Exception:
                    logger.exception("engine loop hook %s failed", getattr(hook, "__name__", hook))
            if self.engine.has_unfinished_requests():
                self._step()
        self._fail_pending_commands()

    def _run_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The engine already aborts the requests of a failed model step; anything else is a
            # bug: fail every request rather than spin on it.
            logger.exception("engine step failed; aborting %d requests", len(self.engine.requests))
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            return
        self.num_steps += 1
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        if output.held_kv is not None and self.on_held_kv is not None:
            self.on_held_kv(output)
        stream = self._streams.get(output.request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, output)

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineLoopStopped("the engine loop has stopped"))


def _undo(future: concurrent.futures.Future[T], undo: Callable[[T], object]) -> None:
    """Hand fn's result to undo, unless fn raised; fn has run by now (commands run in order)."""
    if future.exception(timeout=0) is None:
        undo(future.result())
