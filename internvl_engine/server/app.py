"""The OpenAI-compatible HTTP front end: a FastAPI app over one AsyncLLM (docs/ARCHITECTURE.md, "Front ends, one
engine"). It translates requests (protocol.py), streams RequestOutputs back as SSE, and maps the engine's typed
errors to HTTP statuses; it holds no engine logic.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics, GET /version,
POST /tokenize, POST /detokenize, GET /tokenizer_info (tokens.py).

Life of a generation request: the body is read (413 over max_request_bytes) and parsed (400, nesting bounded before
the parser recurses), the model name checked (404), the request's size checked before any work (400: more prompts
than --max-prompts or than could ever wait, more text than --max-prompt-chars), a chat conversation rendered here
when it carries chat_template_kwargs or its answer's think block is to go out as reasoning_content (the engine then
gets the raw prompt it encodes to), the engine's health (503) and waiting queue (429) checked, then the request is
submitted (AsyncLLM.generate) under a fresh engine request id (the caller's X-Request-Id is a label, echoed back)
and the server waits for its first output before answering, so whatever the engine refuses (a bad conversation,
refused media, bad sampling values: 400 or 413) or fails before the first token (500, 503) gets its own status.
Then the outputs stream as SSE or are collected into one body.

Nothing buffers for a client: the server takes an output from the engine only when the previous one is written,
so a client that stops reading stalls its requests' AsyncLLM consumers (which abort them after consumer_timeout_s),
and a stream write that waits stream_stall_timeout_s cuts the client off. A client that goes away (seen by a task
reading the connection, so also before the first token) cancels the consumer, which closes the generator, which
aborts the request in the engine: its blocks are freed at the next step. Requests still running when uvicorn cuts
them at --shutdown-timeout get a 503 (streams: an error event, then [DONE])."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..settings import EngineConfigError, ServerSettings
from ..errors import EngineDeadError, StructuredOutputError
from ..processor import prompt_opens_thinking
from . import protocol as P
from . import tokens as T
from .headers import RequestIdMiddleware, config_fingerprint
from .unsupported import refuse_unimplemented
from .structured import constraint_param
from .tools import template_variables
from .metrics import STATUS_OUTCOME, HTTPMetricsMiddleware, ServerMetrics

# ------------------------------------------------------------------------------------------------ streams
class _Submitted:
    """One engine request: its AsyncLLM.generate generator and the task that ran the generator's first step (the
    submission) and waits for its first output. Iterating yields its RequestOutputs; close() aborts it if unfinished."""

    def __init__(self, request_id: str, gen, first: asyncio.Future):
        self.request_id, self.gen, self.first = request_id, gen, first
        self._iterated = False  # outputs() has begun: it alone reads the generator from now on
        self._taking: asyncio.Task | None = None
        self._newest = None

    def keep_taking(self) -> None:
        """From its first output until outputs() is iterated, take this request's outputs as they come, keeping the
        newest (each is a cumulative snapshot): the response waits meanwhile for its other prompts' first outputs,
        and a request left unread that long looked to AsyncLLM like a stalled consumer (aborted, a 408)."""
        def start(first):
            if not self._iterated and not first.cancelled() and first.exception() is None \
                    and not first.result().finished:
                self._taking = asyncio.ensure_future(self._take())
        self.first.add_done_callback(start)

    async def _take(self) -> None:
        while not self._iterated:
            try:
                self._newest = await self.gen.__anext__()
            except StopAsyncIteration:
                return
            if self._newest.finished:
                return

    async def outputs(self):
        self._iterated = True
        try:
            yield await self.first
            if self._taking is not None:
                await self._taking  # ends with the next output (or raises the request's error)
                if self._newest is not None:
                    yield self._newest
            async for out in self.gen:
                yield out
        finally:
            await self.close()

    async def close(self) -> None:
        self._iterated = True
        if not self.first.done():
            self.first.cancel()  # CancelledError inside the generator: it aborts the request
            with contextlib.suppress(BaseException):
                await self.first
        if self._taking is not None:
            self._taking.cancel()  # likewise
            with contextlib.suppress(BaseException):
                await self._taking
        await self.gen.aclose()  # an unfinished generator aborts the request as it closes


async def _merged(subs: list[_Submitted]):
    """(prompt index, RequestOutput) of several requests as they come; closing it closes (aborts) all of them. The
    queue holds at most one output per request: a consumer that stops taking them stops the pumps, so its
    requests' own queues (AsyncLLM's, coalescing) see a stalled consumer instead of one that drains everything."""
    if len(subs) == 1:
        it = subs[0].outputs()
        try:
            async for out in it:
                yield 0, out
        finally:
            await it.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(subs))
    done = object()

    async def pump(i, sub):
        try:
            async for out in sub.outputs():
                await queue.put((i, out))
            item = done
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            item = e
        await queue.put((i, item))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(subs)]
    try:
        left = len(subs)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in subs:
            await s.close()


class SSEResponse(StreamingResponse):
    """text/event-stream from an async generator of str. A task reads the connection meanwhile: when the client
    disconnects it cancels the response (so the generator, and with it the engine request, ends at once, even while
    waiting for a token). A client that takes no data for stall_timeout seconds (up to a quarter more) while a write
    waits is cut off the same way, and its connection closed. A cancellation from outside (uvicorn cutting requests at
    --shutdown-timeout) ends the stream with an error event and [DONE]. `record(cut)` is called once at the end:
    cut is None when the body ran to its end, else "gone" (client left or stalled) or "shutdown"."""
    media_type = "text/event-stream"

    def __init__(self, body, headers: dict, stall_timeout: float | None, record):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.stall_timeout, self.record = stall_timeout, record

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        state = {"closing": False, "gone": False, "writing_since": None}

        def gone():
            if not state["closing"] and not state["gone"]:
                state["gone"] = True
                task.cancel()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone()

        async def write(body: bytes, more: bool = True):
            # uvicorn's send waits while the transport is paused, i.e. while the client does not read
            state["writing_since"] = loop.time()
            await send({"type": "http.response.body", "body": body, "more_body": more})
            state["writing_since"] = None

        async def watch_stalls(timeout: float):
            # one look every quarter timeout, rather than a timer per chunk
            while True:
                await asyncio.sleep(timeout / 4)
                since = state["writing_since"]
                if since is not None and loop.time() - since > timeout:
                    gone()
                    return

        watcher = asyncio.ensure_future(watch())
        stalls = asyncio.ensure_future(watch_stalls(self.stall_timeout)) if self.stall_timeout else None
        cut = None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await write(chunk.encode())
            await write(b"", more=False)
            state["closing"] = True  # at once: the watcher hears a disconnect once the response is complete
        except asyncio.CancelledError:
            if state["gone"]:
                task.uncancel()
                cut = "gone"  # returning with the response unfinished: uvicorn closes the connection
            elif task.uncancel():
                raise
            else:
                cut = "shutdown"
                state["closing"] = True
                watcher.cancel()
                await self.body_iterator.aclose()  # aborts the engine requests before the client hears
                with contextlib.suppress(OSError):
                    await send({"type": "http.response.body", "more_body": False,
                                "body": (P.sse(P.error_body(_shutting_down())) + P.SSE_DONE).encode()})
        except OSError:  # the client went away while we wrote
            cut = "gone"
        finally:
            state["closing"] = True
            watcher.cancel()
            if stalls is not None:
                stalls.cancel()
            await self.body_iterator.aclose()
            self.record(cut)


def _shutting_down() -> P.APIError:
    return P.APIError(503, "the request was cut: the server is shutting down (--shutdown-timeout)",
                      "service_unavailable_error", "shutting_down")


async def _unless_disconnected(receive, coro):
    """Runs coro; if the client disconnects first, cancels it and returns None."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ------------------------------------------------------------------------------------------------ the server
# --reasoning-parser: when a chat answer's think block goes out as reasoning_content (vLLM's parser names for the
# <think> format are taken as "think")
REASONING_PARSERS = {"auto": "auto", "think": "think", "qwen3": "think", "deepseek_r1": "think", "none": "none"}


class OpenAIServer:
    def __init__(self, llm, settings: ServerSettings):
        self.llm, self.settings = llm, settings
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self.pending = 0  # requests submitted that have no first output yet (preprocessing, waiting, prefilling)
        self.active: set[str] = set()  # engine request ids in flight
        tokenizer = llm.engine.tokenizer
        self.decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)
        self.decode_ids = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.fingerprint = config_fingerprint(llm.engine)
        if llm.engine.engine_config.media_policy != settings.media_policy():  # what the media flags promise
            raise EngineConfigError("the engine's media_policy is not the one the server settings describe: build "
                                    "it with media_policy=settings.media_policy()")
        parser = REASONING_PARSERS.get(settings.reasoning_parser)
        if parser is None:
            raise EngineConfigError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got "
                                    f"{settings.reasoning_parser!r}")
        self.split_reasoning = parser == "think" or (parser == "auto"
                                                     and llm.engine.processor.thinking_mode is not None)

    # -- request plumbing
    def error_response(self, e: BaseException, count: bool = True, headers: dict | None = None):
        if isinstance(e, _ClientGone):  # nobody is listening: whatever was started is aborted already
            if count:
                self.metrics.outcome("abort")
            return PlainTextResponse("", status_code=499)
        err = P.error_of(e)
        if count:
            self.metrics.outcome(STATUS_OUTCOME.get(err.status, "error"))
        if err.status == 429:  # the queue drains as requests finish: a second is a step of many
            headers = {**(headers or {}), "Retry-After": "1"}
        return JSONResponse(P.error_body(err), status_code=err.status, headers=headers)

    async def read_json(self, request: Request) -> dict:
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise P.APIError(413, f"request body of {length} bytes is over the {limit}-byte limit "
                                  "(--max-request-bytes)", code="request_too_large")
        parts, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise P.APIError(413, f"request body is over the {limit}-byte limit (--max-request-bytes)",
                                     code="request_too_large")
                parts.append(chunk)
        except ClientDisconnect:  # the client left while sending: not the server's error
            raise _ClientGone() from None
        return P.parse_body(b"".join(parts), self.settings.max_json_depth)

    @staticmethod
    def parse(model, body: dict):
        from pydantic import ValidationError
        refuse_unimplemented(model, body)
        try:
            return model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ()))
            raise P.APIError(400, f"invalid request: {param}: {first.get('msg')}" if param else
                             f"invalid request: {first.get('msg')}", param=param or None) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise P.APIError(404, f"the model {name!r} does not exist; this server serves "
                                  f"{self.settings.model_name!r}", code="model_not_found", param="model")

    def check_size(self, prompts: list, param: str) -> None:
        """Refuses, before any work, a request that can never be served: more prompts than a request may carry or
        than the waiting queue could ever take (a 429 would tell the client to retry what cannot succeed), or more
        text than the limit (tokenising it would hold the engine's intake for seconds per megabyte)."""
        count, cap, most = len(prompts), self.settings.max_waiting, self.settings.max_prompts
        if count > most:
            raise P.APIError(400, f"the request has {count} prompts, over the {most} limit (--max-prompts)",
                             code="too_many_prompts", param=param)
        if cap is not None and count > cap:
            raise P.APIError(400, f"the request has {count} prompts but at most {cap} requests may wait "
                                  "(--max-waiting): it can never be admitted", code="too_many_prompts", param=param)
        chars = self.settings.max_prompt_chars
        if chars is not None and (n := P.text_chars(prompts)) > chars:
            raise P.APIError(400, f"the request has {n} characters of text, over the {chars} limit "
                                  "(--max-prompt-chars)", code="prompt_too_long", param=param)
        P.check_unicode(prompts)

    async def check_constraint(self, req, params) -> None:
        """A constraint that does not compile is a 400 naming the request field it came from (the engine's intake
        would refuse it too, but names it by its SamplingParams field); compiled off the event loop (a hostile schema
        may take long) into the compiler's cache, which intake then reads."""
        if params.structured_outputs is None:
            return
        compiler = self.llm.engine.inputs.structured.compiler
        try:
            await asyncio.get_running_loop().run_in_executor(None, compiler.compile, params.structured_outputs)
        except StructuredOutputError as e:
            raise P.APIError(400, f"{constraint_param(req)}: {e}", code="StructuredOutputError",
                             param=constraint_param(req)) from None

    def admit(self, count: int) -> None:
        self.llm.check_health()  # EngineDeadError -> 503
        cap = self.settings.max_waiting
        if cap is not None:
            waiting = max(self.llm.engine.stats().waiting, self.pending)
            if waiting + count > cap:
                raise P.APIError(429, f"{waiting} requests are waiting, the limit is {cap} (--max-waiting); "
                                      "retry later", "rate_limit_error", "queue_full")

    @staticmethod
    def new_request_id(kind: str) -> str:
        """The response's id, and the engine's request id: always fresh, so nothing a client sends (X-Request-Id
        is a label, echoed back) can name, collide with or abort another request in the engine."""
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def render_chat(self, req: P.ChatCompletionRequest, prompts: list) -> tuple[list, bool | None]:
        """(prompts, reasoning): a conversation with template variables (chat_template_kwargs, the tools it offers),
        or whose answer's think block is to be split (which needs to know whether the prompt opened one), is rendered
        here and handed to the engine as the raw prompt it encodes to (Processor.render_request); reasoning as
        ResponseBuilder takes it."""
        variables = template_variables(req.chat_template_kwargs, req.tool_settings)  # the offered tools in them
        if variables is None and not self.split_reasoning:
            return prompts, None
        raw = self.llm.engine.processor.render_request(prompts[0], variables)
        return [raw], (prompt_opens_thinking(raw["prompt"]) if self.split_reasoning else None)

    def submit(self, request_id: str, prompt, params) -> _Submitted:
        """Starts one request: a task takes its generator's first step (AsyncLLM.generate submits it there) and
        waits for its first output; until then it counts as waiting."""
        gen = self.llm.generate(prompt, params, request_id)
        first = asyncio.ensure_future(gen.__anext__())
        self.pending += 1
        first.add_done_callback(self._first_done)
        return _Submitted(request_id, gen, first)

    def _first_done(self, _) -> None:
        self.pending -= 1

    async def generate(self, request: Request, kind: str, req, prompts: list, params, headers: dict,
                       reasoning: bool | None = None, echo=None):
        """Submits the request's prompts and waits for each one's first output before answering, so whatever the
        engine refuses (bad input, refused media, a failure before the first token) gets its own status rather than
        an error inside a 200 stream; a client that leaves meanwhile aborts them."""
        self.admit(len(prompts))
        rid = self.new_request_id(kind)
        subs = [self.submit(rid if len(prompts) == 1 else f"{rid}-{i}", prompt,
                            params if len(prompts) == 1 else dataclasses.replace(params))
                for i, prompt in enumerate(prompts)]
        if len(subs) > 1:
            for s in subs:
                s.keep_taking()
        try:
            started = await _unless_disconnected(request.receive, asyncio.wait(
                [s.first for s in subs], return_when=asyncio.FIRST_EXCEPTION))
            if started is None:
                raise _ClientGone()
            for s in subs:
                if s.first.done() and not s.first.cancelled() and s.first.exception() is not None:
                    raise s.first.exception()
        except BaseException:
            for s in subs:
                await s.close()
            raise
        builder = P.ResponseBuilder(kind, rid, int(time.time()), self.settings.model_name, params.n,
                                    params.logprobs, req.include_usage, self.decode, req.return_token_ids, reasoning,
                                    fingerprint=self.fingerprint, echo=echo,
                                    prompt_logprobs=kind == "completion" and req.prompt_logprobs is not None,
                                    tools=getattr(req, "tool_settings", None))
        if req.stream:
            result: dict = {}

            def record(cut):
                self.metrics.outcome(result.get("outcome") or ("unavailable" if cut == "shutdown" else "abort"))

            return SSEResponse(self.stream_body(builder, subs, kind == "chat", result), headers,
                               self.settings.stream_stall_timeout_s, record)
        body = await _unless_disconnected(request.receive, self.collect(builder, subs))
        if body is None:
            raise _ClientGone()
        self.metrics.outcome("success")
        return JSONResponse(body, headers=headers)

    @staticmethod
    def finish(finals: list) -> str:
        """The HTTP outcome of finished requests (the engine counts each request's finish reason and timings)."""
        outcome = "success"
        for out in finals:
            if out is None or any(c.finish_reason == "abort" for c in P.samples(out)):
                outcome = "abort"
        return outcome

    async def collect(self, builder: P.ResponseBuilder, subs: list[_Submitted]) -> dict:
        """The whole response body; raises what failed the request (500 while running, 503 engine dead or the
        request aborted under it)."""
        finals = [None] * len(subs)
        merged = _merged(subs)
        self.active.update(s.request_id for s in subs)
        try:
            async for i, out in merged:
                if out.finished:
                    finals[i] = out
        finally:
            await merged.aclose()
            self.active.difference_update(s.request_id for s in subs)
        if self.finish(finals) != "success":
            raise P.APIError(503, "the request was aborted (the server is shutting down)", "service_unavailable_error",
                             "aborted")
        return builder.response(finals)

    async def stream_body(self, builder: P.ResponseBuilder, subs: list[_Submitted], chat: bool, result: dict):
        """The SSE events; result["outcome"] is set once the stream reaches its end (finished, aborted by the engine,
        or an error), not when it is cut (SSEResponse tells then)."""
        finals = [None] * len(subs)
        choices = builder.streams(len(subs))
        single = len(subs) == 1  # the usual case: one generator fewer on every token's way
        merged = subs[0].outputs() if single else _merged(subs)
        self.active.update(s.request_id for s in subs)
        try:
            if chat:
                yield builder.role_chunk(range(len(subs) * builder.n))
            async for item in merged:
                i, out = (0, item) if single else item
                for chunk in builder.chunks(out, choices[i]):
                    yield chunk
                if out.finished:
                    finals[i] = out
            if builder.include_usage:
                yield builder.usage_chunk(finals)
            result["outcome"] = self.finish(finals)
            yield P.SSE_DONE
        except Exception as e:  # failed while running, or the engine died: an error event, then [DONE]
            err = P.error_of(e)
            result["outcome"] = STATUS_OUTCOME.get(err.status, "error")
            yield P.sse(P.error_body(err))
            yield P.SSE_DONE
        finally:
            await merged.aclose()
            self.active.difference_update(s.request_id for s in subs)

    # -- routes
    async def _generation(self, request: Request, kind: str):
        """One generation request, start to answer; every way it can end is counted once in /metrics."""
        label = request.headers.get("x-request-id")
        headers = {"X-Request-Id": label} if label else {}
        try:
            if kind == "chat":
                req = self.parse(P.ChatCompletionRequest, await self.read_json(request))
                self.check_model(req.model)
                prompts = P.chat_prompts(req)
                self.check_size(prompts, "messages")
                params = P.chat_sampling_params(req, self.settings.default_max_tokens)
                await self.check_constraint(req, params)
                prompts, reasoning = self.render_chat(req, prompts)
            else:
                req = self.parse(P.CompletionRequest, await self.read_json(request))
                self.check_model(req.model)
                prompts = P.completion_prompts(req)
                self.check_size(prompts, "prompt")
                T.check_token_prompts(prompts, self.llm.engine.config.text.vocab_size, self.llm.engine.max_model_len)
                params = P.completion_sampling_params(req)
                await self.check_constraint(req, params)
                reasoning = None
                echo = P.completion_echo(req, prompts, self.decode_ids)
            return await self.generate(request, kind, req, prompts, params, headers, reasoning,
                                       echo if kind == "completion" else None)
        except asyncio.CancelledError:
            # uvicorn cancels the handlers still running at --shutdown-timeout (client disconnects never cancel
            # this task): the engine requests are aborted already; the client gets a 503 rather than uvicorn's
            # plain-text 500
            if asyncio.current_task().uncancel():
                raise
            return self.error_response(_shutting_down(), headers=headers)
        except Exception as e:
            return self.error_response(e, headers=headers)

    async def chat(self, request: Request):
        return await self._generation(request, "chat")

    async def completions(self, request: Request):
        return await self._generation(request, "completion")

    async def models(self, request: Request):
        engine = self.llm.engine
        # the longest sequence one request can have: the model's context, or less when the KV pool holds less
        pool = engine.stats().kv_pool_tokens
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": self.created,
             "owned_by": "internvl-engine", "root": str(engine.engine_config.model),
             "max_model_len": min(engine.max_model_len, pool)}]})

    async def health(self, request: Request):
        try:
            self.llm.check_health()
        except EngineDeadError as e:
            return self.error_response(e, count=False)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request):
        return PlainTextResponse(self.metrics.render(self.llm, self.settings.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def version(self, request: Request):
        return JSONResponse({"version": __version__, "name": "internvl-engine"})

    async def tokenize(self, request: Request):
        try:
            return JSONResponse(await T.tokenize(self, await self.read_json(request)))
        except Exception as e:
            return self.error_response(e, count=False)

    async def detokenize(self, request: Request):
        try:
            return JSONResponse(T.detokenize(self, await self.read_json(request)))
        except Exception as e:
            return self.error_response(e, count=False)

    async def tokenizer_info(self, request: Request):
        return JSONResponse(T.tokenizer_info(self))

    async def shutdown(self) -> None:
        """Lifespan end: whatever is still in flight (uvicorn has already waited out --shutdown-timeout and cancelled
        the handlers, which aborts their requests) is aborted."""
        for request_id in list(self.active):
            self.llm.abort(request_id)


TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


class _APIKeyMiddleware:
    """Pure ASGI (no response buffering): /v1/* and the tokenizer's routes need "Authorization: Bearer <key>"; 401
    in OpenAI's shape. (vLLM leaves /tokenize open; here it reads and decodes a conversation's media, as work a key
    guards.)"""

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server
        self.expected = ("Bearer " + server.settings.api_key).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in TOKENIZER_ROUTES):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                response = self.server.error_response(P.APIError(
                    401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authentication_error",
                    "invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _warm_structured(llm) -> None:
    with contextlib.suppress(Exception):  # without llguidance a structured request is refused with the reason then
        llm.engine.inputs.structured.compiler.lltokenizer


def build_app(llm, settings: ServerSettings) -> FastAPI:
    """The ASGI app over `llm` (an AsyncLLM the caller owns, built with media_policy=settings.media_policy(): an
    engine whose media policy differs from the settings' is an EngineConfigError)."""
    server = OpenAIServer(llm, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # llguidance's token trie takes 1-2 s to build; built here, beside startup, rather than inside the first
        # structured request's intake (GrammarCompiler builds it lazily for engines that never serve one)
        warm = asyncio.get_running_loop().run_in_executor(None, _warm_structured, llm)
        yield
        await server.shutdown()
        await warm

    app = FastAPI(title="internvl-engine", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", server.tokenizer_info, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 / 405 from routing, in OpenAI's shape
        return JSONResponse(P.error_body(P.APIError(exc.status_code, str(exc.detail), "invalid_request_error")),
                            status_code=exc.status_code)

    if settings.api_key:
        app.add_middleware(_APIKeyMiddleware, server=server)
    # every route's count and time (401s included: it wraps the key check)
    app.add_middleware(HTTPMetricsMiddleware, metrics=server.metrics, routes=lambda: [r.path for r in app.routes])
    app.add_middleware(RequestIdMiddleware)  # outermost: its header reaches every answer, a 401 included
    return app
