"""Front ends that share one engine between many callers: a background thread steps the LLMEngine while requests
are in flight and hands each step's outputs to their submitters.

- `AsyncLLM.generate(conversation, params, request_id)` is an async generator of RequestOutput snapshots (the last
  one has `finished`), safe to call from many coroutines of one or several event loops; cancelling or closing the
  generator aborts the request.
- `AsyncLLM.submit(...)` returns a concurrent.futures.Future of the final RequestOutput, for plain threads.
- `abort(request_id)` from anywhere; the request finishes with finish_reason "abort" and its KV blocks are freed.

The engine's own lock serialises add_request / abort / step, so callers never touch the model concurrently.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from ..errors import EngineDeadError, PromptError, RequestFailedError
from ..outputs import RequestOutput
from .llm_engine import LLMEngine


class _EngineLoop:
    """Steps the engine on one daemon thread while any request is unfinished; sleeps otherwise. Nothing a caller
    hands over (a cancelled future, a closed event loop, a consumer that raises) can raise inside this thread: a
    delivery that fails aborts that request alone. Only an engine death ends the loop, failing every request in
    flight with EngineDeadError."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._poke = False  # an abort's final output is handed out by the next step, even with nothing else to run
        self._aborts: collections.deque[str] = collections.deque()  # request ids to abort, from any thread
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="internvl-engine-loop", daemon=True)
        self._thread.start()

    def check_health(self) -> None:
        self.engine.check_health()
        if not self._thread.is_alive() and not self._stopped:
            raise EngineDeadError("the engine loop thread is not running")

    def add(self, request_id: str, conversation, params, sink) -> None:
        self.check_health()
        with self._lock:
            if request_id in self._sinks:
                raise PromptError(f"request id {request_id!r} is already in flight")
            self._sinks[request_id] = sink
        try:
            self.engine.add_request(request_id, conversation, params)  # bad input raises here, to the caller
        except BaseException:
            with self._lock:
                self._sinks.pop(request_id, None)
            raise
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Queue an abort for the loop thread (the engine lock is held through a whole step: a caller's event loop
        must not wait for it). True when the request is in flight here."""
        with self._lock:
            known = request_id in self._sinks
        self._aborts.append(request_id)
        self._poke = True
        self._wake.set()
        return known

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            sink = self._sinks.get(out.request_id)
            if sink is not None and out.finished:
                del self._sinks[out.request_id]
        if sink is None:
            return
        try:
            self.engine.faults.check("deliver", (out.request_id,))
            sink(out)
        except Exception as e:  # the consumer is gone or broken: that request ends, nothing else notices
            with self._lock:
                self._sinks.pop(out.request_id, None)
            self.engine.abort(out.request_id)
            try:  # tell the consumer, if it can still hear
                sink(RequestFailedError(out.request_id, "deliver", e))
            except Exception:
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            try:
                sink(error)
            except Exception:  # a consumer that cannot take it is gone anyway
                pass

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished_requests() and not self._poke:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            self._poke = False
            while self._aborts:
                self.engine.abort(self._aborts.popleft())
            try:
                outputs = self.engine.step()
            except EngineDeadError as e:
                self._fail_all(e)
                return
            except BaseException as e:  # a fault outside any request's stages: the engine cannot vouch for itself
                self._fail_all(self.engine._die(f"engine loop: {type(e).__name__}: {e}"))
                return
            for out in outputs:
                self._deliver(out)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)


class AsyncLLM:
    """`AsyncLLM(model, **settings)` takes LLMEngine's arguments (EngineConfig: dtype, device, backend, ...)."""

    def __init__(self, model, **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self._loop = _EngineLoop(self.engine)

    def check_health(self) -> None:
        """Raises EngineDeadError (saying why) once the engine or its loop thread is dead."""
        self._loop.check_health()

    async def generate(self, conversation, params=None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """RequestOutput snapshots of one request; a request that fails while running raises its
        RequestFailedError here, a dead engine EngineDeadError."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request_id or uuid.uuid4().hex

        def sink(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)  # raises once the loop is closed: the request ends

        # preprocessing (image decoding, URL fetches) and the engine lock stay off the caller's event loop
        add = loop.run_in_executor(None, self._loop.add, request_id, conversation, params, sink)
        try:
            await asyncio.shield(add)
        except asyncio.CancelledError:  # the caller left while the request was being added: abort it once it is
            add.add_done_callback(lambda f: f.exception() is None and self._loop.abort(request_id))
            raise
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise item.error
                yield item
        finally:
            if not finished:  # cancelled, or the consumer stopped iterating
                self._loop.abort(request_id)

    def submit(self, conversation, params=None, request_id: str | None = None) -> Future:
        """Thread-friendly: a Future of the final RequestOutput (its exception: the request's error). Cancelling
        the future aborts the request."""
        future: Future = Future()
        request_id = request_id or uuid.uuid4().hex

        def sink(item):
            if future.done():
                return
            if isinstance(item, BaseException):
                future.set_exception(item)
            elif item.error is not None:
                future.set_exception(item.error)
            elif item.finished:
                future.set_result(item)

        def on_done(f):
            if f.cancelled():
                self._loop.abort(request_id)

        self._loop.add(request_id, conversation, params, sink)
        future.add_done_callback(on_done)
        return future

    def abort(self, request_id: str) -> bool:
        return self._loop.abort(request_id)

    def shutdown(self) -> None:
        """Stop the loop thread, then the engine (its tensor-parallel workers, if any)."""
        self._loop.stop()
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
