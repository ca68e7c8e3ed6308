"""Front ends that share one engine between many callers: a background thread steps the LLMEngine while requests
are in flight and hands each step's outputs to their submitters.

- `AsyncLLM.generate(conversation, params, request_id)` is an async generator of RequestOutput snapshots (the last
  one has `finished`), safe to call from many coroutines of one or several event loops; cancelling or closing the
  generator aborts the request.
- `AsyncLLM.submit(...)` returns a concurrent.futures.Future of the final RequestOutput, for plain threads.
- `abort(request_id)` from anywhere; the request finishes with finish_reason "abort" and its KV blocks are freed.

The engine's own lock serialises add_request / abort / step, so callers never touch the model concurrently.

Nothing a consumer does grows without bound: a generate() request keeps at most one unread output (a newer
cumulative snapshot replaces it, "delta" outputs merge into it) besides its final output or error, and a consumer
that leaves outputs unread for `consumer_timeout_s` is aborted.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator, Callable

from ..errors import EngineDeadError, PromptError, RequestFailedError, SlowConsumerError
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from .llm_engine import LLMEngine

# Adding a request runs its preprocessing, which for media may wait on URL fetches (up to the media policy's
# fetch_timeout_s each): such requests get their own pool, so a text-only request never queues behind them.
MEDIA_ADD_WORKERS = 8
TEXT_ADD_WORKERS = 4


def carries_media(conversation) -> bool:
    """Whether a request may read images or videos, from the conversation's structure alone (no decoding): any
    content item other than text, or a raw prompt with images / videos. Unsure means yes."""
    if isinstance(conversation, str):
        return False
    if isinstance(conversation, dict):
        return bool(conversation.get("images") or conversation.get("videos"))
    if not isinstance(conversation, (list, tuple)):
        return True
    for msg in conversation:
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            return True
        for item in content:
            if not isinstance(item, str) and not (isinstance(item, dict) and item.get("type") == "text"):
                return True
    return False


def merge_deltas(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One "delta" output saying what `old` and `new` say together. `old` is unread (nobody else holds it), so it
    grows in place: merging stays O(new), not O(everything unread)."""
    for a, b in zip(old.outputs, new.outputs):
        a.text += b.text
        a.delta += b.delta
        a.token_ids.extend(b.token_ids)
        if a.logprobs is not None and b.logprobs is not None:
            a.logprobs.extend(b.logprobs)
        a.finish_reason, a.cumulative_logprob, a.stop_reason, a.error = \
            b.finish_reason, b.cumulative_logprob, b.stop_reason, b.error
    first = old.outputs[0] if old.outputs else None
    return dataclasses.replace(
        new, text=first.text if first else old.text + new.text,
        token_ids=first.token_ids if first else old.token_ids + new.token_ids,
        delta=first.delta if first else old.delta + new.delta, outputs=old.outputs)


def _supersede(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """A cumulative snapshot holds everything `old` did except the text deltas of the steps in between."""
    for a, b in zip(old.outputs, new.outputs):
        b.delta = a.delta + b.delta
    new.delta = old.delta + new.delta
    return new


class _Request:
    """One request instance in flight through an _EngineLoop. The caller's id is its label; aborts and outputs
    reach this instance only, never a later request that reuses the id."""
    __slots__ = ("request_id", "sink", "channel", "added", "aborted", "gone")

    def __init__(self, request_id: str, sink: Callable, channel: "_Channel | None"):
        self.request_id, self.sink, self.channel = request_id, sink, channel
        self.added = False    # in the engine (add_request returned)
        self.aborted = False  # an abort was asked for
        self.gone = False     # its consumer is gone or too slow: outputs are dropped until its final one passes


class _Channel:
    """The outputs of one generate() request on their way from the loop thread to the consumer's event loop: at
    most one unread running output (coalesced) and the final output or error, which is never lost. The consumer's
    loop is woken by at most one scheduled callback at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output_kind: str):
        self._loop, self._delta = loop, output_kind == "delta"
        self._lock = threading.Lock()
        self.pending: RequestOutput | None = None
        self.last: RequestOutput | BaseException | None = None
        self._last_taken = False
        self.waiting_since: float | None = None  # monotonic time the oldest unread output arrived
        self.event = asyncio.Event()
        self._wake_scheduled = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """From any thread. Raises when the consumer's event loop is closed (its request then ends)."""
        with self._lock:
            if self.last is not None:  # the request already ended for this consumer
                return
            if isinstance(item, BaseException) or item.finished:
                self.last = item
            elif self.pending is None:
                self.pending = item
            else:
                self.pending = (merge_deltas if self._delta else _supersede)(self.pending, item)
            if self.waiting_since is None:
                self.waiting_since = time.monotonic()
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        self.event.set()

    def take(self) -> RequestOutput | BaseException | None:
        with self._lock:
            if self.pending is not None:
                item, self.pending = self.pending, None
            elif self.last is not None and not self._last_taken:
                item, self._last_taken = self.last, True
            else:
                return None
            more = self.pending is not None or (self.last is not None and not self._last_taken)
            self.waiting_since = time.monotonic() if more else None
            return item


class _EngineLoop:
    """Steps the engine on one daemon thread while any request is unfinished; sleeps otherwise. Nothing a caller
    hands over (a cancelled future, a closed event loop, a consumer that raises or stops reading) can raise inside
    this thread: a delivery that fails aborts that request alone. Only an engine death or stop() ends the loop,
    failing every request in flight with EngineDeadError.

    A request id stays registered here until the engine's final output for it has passed (even when its consumer
    has left), so no second request with that id can be in the engine while an abort or output of the first is
    still on its way."""

    def __init__(self, engine: LLMEngine, consumer_timeout_s: float | None):
        self.engine = engine
        self.consumer_timeout_s = consumer_timeout_s
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._poke = False  # an abort's final output is handed out by the next step, even with nothing else to run
        self._aborts: collections.deque[_Request] = collections.deque()  # requests to abort, from any thread
        self._stopped = False
        self._next_reap = 0.0  # monotonic time of the next look for slow consumers
        self._thread = threading.Thread(target=self._run, name="internvl-engine-loop", daemon=True)
        self._thread.start()

    def check_health(self) -> None:
        if self._stopped:
            raise EngineDeadError("the engine was shut down (AsyncLLM.shutdown)")
        self.engine.check_health()
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop thread is not running")

    def register(self, request_id: str, sink: Callable, channel: _Channel | None = None) -> _Request:
        """Claims the id (a PromptError while a request with it is in flight) before the request is added."""
        if not isinstance(request_id, str):
            raise PromptError(f"request_id must be a string, got {type(request_id).__name__}")
        self.check_health()
        req = _Request(request_id, sink, channel)
        with self._lock:
            if self._stopped:  # checked again under the lock: stop() fails whatever is registered by then
                raise EngineDeadError("the engine was shut down (AsyncLLM.shutdown)")
            if request_id in self._requests:
                raise PromptError(f"request id {request_id!r} is already in flight")
            self._requests[request_id] = req
        return req

    def start(self, req: _Request, conversation, params, output_kind: str | None = None) -> None:
        """Adds a registered request to the engine (bad input raises here, to the caller, and unregisters it)."""
        try:
            # its outputs reach _deliver whichever thread steps the engine (an LLM may share it): step() would hand
            # them to that thread's caller, which drops what is not its own
            self.engine.add_request(req.request_id, conversation, params, output_kind, self._deliver)
        except BaseException:
            self._unregister(req)
            raise
        with self._lock:
            req.added = True
            if req.aborted:  # aborted while it was being added
                self._aborts.append(req)
                self._poke = True
        self._wake.set()

    def _unregister(self, req: _Request) -> None:
        with self._lock:
            if self._requests.get(req.request_id) is req:
                del self._requests[req.request_id]

    def abort_request(self, req: _Request) -> None:
        """Queue an abort of this request instance for the loop thread (the engine lock is held through a whole
        step: a caller's event loop must not wait for it)."""
        with self._lock:
            if req.aborted or self._requests.get(req.request_id) is not req:
                return
            req.aborted = True
            if not req.added:  # start() queues it once the engine has it
                return
            self._aborts.append(req)
            self._poke = True
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Abort the request now in flight under this id; True when there is one."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is None:
            return False
        self.abort_request(req)
        return True

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            req = self._requests.get(out.request_id)
            if req is not None and out.finished:
                del self._requests[out.request_id]
        if req is None or req.gone:
            return
        try:
            self.engine.faults.check("deliver", (out.request_id,))
            req.sink(out)
        except Exception as e:  # the consumer is gone or broken: that request ends, nothing else notices
            self._drop(req, e, out.finished)

    def _drop(self, req: _Request, cause: Exception, finished: bool = False) -> None:
        """On the loop thread: end a request whose consumer cannot or does not take its outputs."""
        req.gone = True
        if not finished:
            if req.added:
                self.engine.abort(req.request_id)  # safe: the id stays registered until this abort's output passes
            else:
                self.abort_request(req)
        try:  # tell the consumer, if it can still hear
            req.sink(RequestFailedError(req.request_id, "deliver", cause))
        except Exception:
            pass

    def _reap_slow_consumers(self) -> None:
        timeout = self.consumer_timeout_s
        now = time.monotonic()
        if timeout is None or now < self._next_reap:
            return
        self._next_reap = now + timeout / 4  # a slow consumer is noticed within 1.25 timeouts, at O(requests) a look
        with self._lock:
            slow = [r for r in self._requests.values() if r.channel is not None and not r.gone
                    and r.channel.waiting_since is not None and now - r.channel.waiting_since > timeout]
        for req in slow:
            self._drop(req, SlowConsumerError(
                f"its consumer took no output for {now - req.channel.waiting_since:.1f} s while outputs were "
                f"waiting, over the {timeout:g} s limit (consumer_timeout_s); the request was aborted"))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            reqs, self._requests = list(self._requests.values()), {}
        for req in reqs:
            try:
                req.sink(error)
            except Exception:  # a consumer that cannot take it is gone anyway
                pass

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished_requests() and not self._poke:
                try:  # another thread may have killed it (engine.fail, a shared LLM's step): its requests are gone
                    self.engine.check_health()
                except EngineDeadError as e:
                    self._fail_all(e)
                    return
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            self._poke = False
            while self._aborts:
                req = self._aborts.popleft()
                with self._lock:
                    current = self._requests.get(req.request_id) is req
                if current:  # else it ended already, and the id may belong to a newer request now
                    self.engine.abort(req.request_id)
            try:
                outputs = self.engine.step()
            except EngineDeadError as e:
                self._fail_all(e)
                return
            except BaseException as e:  # a fault outside any request's stages: the engine cannot vouch for itself
                self._fail_all(self.engine.fail(f"engine loop: {type(e).__name__}: {e}"))
                return
            for out in outputs:
                self._deliver(out)
            self._reap_slow_consumers()

    def stop(self) -> None:
        """Refuse new requests, stop stepping, and fail every request in flight with EngineDeadError."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._fail_all(EngineDeadError("the engine was shut down (AsyncLLM.shutdown) while the request was in "
                                       "flight"))


class AsyncLLM:
    """`AsyncLLM(model, **settings)` takes LLMEngine's arguments (EngineConfig: dtype, device, backend,
    consumer_timeout_s, ...)."""

    def __init__(self, model, **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self._loop = _EngineLoop(self.engine, self.engine.engine_config.consumer_timeout_s)
        self._text_pool = ThreadPoolExecutor(TEXT_ADD_WORKERS, thread_name_prefix="internvl-add-text")
        self._media_pool = ThreadPoolExecutor(MEDIA_ADD_WORKERS, thread_name_prefix="internvl-add-media")

    def check_health(self) -> None:
        """Raises EngineDeadError (saying why) once the engine or its loop thread is dead, or after shutdown()."""
        self._loop.check_health()

    async def generate(self, conversation, params=None, request_id: str | None = None,
                       chat_template_kwargs: dict | None = None) -> AsyncIterator[RequestOutput]:
        """RequestOutput snapshots of one request; a request that fails while running raises its
        RequestFailedError here, a dead or shut down engine EngineDeadError. A consumer that leaves outputs untaken
        for consumer_timeout_s gets RequestFailedError (cause SlowConsumerError) and its request is aborted.
        chat_template_kwargs: template variables (enable_thinking, tools), as LLM.generate takes them."""
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        kind = params.output_kind if isinstance(params, SamplingParams) else "cumulative"
        channel = _Channel(loop, kind)
        req = self._loop.register(request_id, channel.put, channel)
        self._start_in_pool(loop, req, conversation, params, channel, chat_template_kwargs)
        finished = False
        try:
            while not finished:
                channel.event.clear()
                item = channel.take()
                if item is None:
                    await channel.event.wait()
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise item.error
                yield item
        finally:
            if not finished:  # cancelled, or the consumer stopped iterating
                self._loop.abort_request(req)

    def _start_in_pool(self, loop, req, conversation, params, channel: _Channel, chat_template_kwargs=None) -> None:
        """Add the request on a pool thread: preprocessing (image decoding, URL fetches) and the engine lock stay off
        the caller's event loop, and requests with media wait in their own pool. An error reaches the consumer
        through its channel, like any other output."""
        def start():
            try:
                request = self.engine.processor.with_template_variables(conversation, chat_template_kwargs)
                self._loop.start(req, request, params)
            except BaseException as e:
                try:
                    channel.put(e)
                except RuntimeError:  # the consumer's event loop is closed: nobody is left to tell
                    pass

        pool = self._media_pool if carries_media(conversation) else self._text_pool
        try:
            loop.run_in_executor(pool, start)
        except RuntimeError:  # the pool was shut down: shutdown() has failed (or will fail) the request
            channel.put(EngineDeadError("the engine was shut down (AsyncLLM.shutdown)"))

    def submit(self, conversation, params=None, request_id: str | None = None) -> Future:
        """Thread-friendly: a Future of the final RequestOutput (its exception: the request's error). Cancelling
        the future aborts the request."""
        future: Future = Future()
        request_id = request_id or uuid.uuid4().hex
        # the future keeps only the final output, which "final_only" builds alone (a cumulative or delta one would
        # copy text, ids and logprobs on every step for nobody)

        def sink(item):
            if future.done():
                return
            if isinstance(item, BaseException):
                future.set_exception(item)
            elif item.error is not None:
                future.set_exception(item.error)
            elif item.finished:
                future.set_result(item)

        req = self._loop.register(request_id, sink)
        self._loop.start(req, conversation, params, "final_only")
        future.add_done_callback(lambda f: f.cancelled() and self._loop.abort_request(req))
        return future

    def abort(self, request_id: str) -> bool:
        """Aborts the request in flight under this id now (not one that reuses the id later); False if none."""
        return self._loop.abort(request_id)

    def shutdown(self) -> None:
        """Fail every request in flight with EngineDeadError, refuse later ones, stop the loop thread, then the
        engine (its tensor-parallel workers, if any)."""
        self._loop.stop()
        self._text_pool.shutdown(wait=False, cancel_futures=True)
        self._media_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
