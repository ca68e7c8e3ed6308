"""The OpenAI wire format and the engine's vocabulary, both ways: a request body becomes a conversation (or a raw
prompt) plus SamplingParams; RequestOutput snapshots become response bodies and SSE chunks; exceptions become
OpenAI-shaped errors with a status. Only renaming and reshaping happen here: every value is checked by the engine
(SamplingParams.validate, the processor, the media policy), whose typed errors become 400s. Messages are read by
the processor's normalize_messages, the same code LLM.generate runs."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt

from ..errors import (EngineDeadError, InternVLEngineError, MediaTooLargeError, PromptError, RequestFailedError,
                      SamplingParamsError, SlowConsumerError)
from ..processor import ReasoningParser, normalize_messages, split_reasoning
from ..sampling import SamplingParams
from .structured import StructuredRequestError, constraint_fields
from .tools import (ToolParser, ToolRequestError, ToolSettings, finish_reason as tool_finish_reason, shape_delta,
                    shape_message, tool_settings)
from .echo import (Echo, end_offset as echo_end, hide_generation, join as join_logprobs,
                   prompt_logprobs as echo_prompt_logprobs)

# per-request processor settings accepted in mm_processor_kwargs (the names InternVL's own code uses) -> SamplingParams
MM_PROCESSOR_KWARGS = {"max_dynamic_patch": "max_num_tiles", "num_frames": "num_frames"}
# request fields passed to SamplingParams under the same name when given (OpenAI's, then vLLM's extras)
SAMPLING_FIELDS = ("top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                   "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                   "include_stop_str_in_output", "stop_token_ids", "prompt_logprobs")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf (vLLM's convention)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


# ------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error the server itself raises, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_of(e: BaseException) -> APIError:
    """The HTTP status and OpenAI error of an exception: the engine's typed input errors are the client's fault
    (400, or 413 over a media size cap), a dead engine is 503, a request that failed while running is 500, one
    aborted because its client took no output for AsyncLLM's consumer_timeout_s is 408."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "service_unavailable_error", "engine_dead")
    if isinstance(e, MediaTooLargeError):
        return APIError(413, str(e), "invalid_request_error", type(e).__name__)
    if isinstance(e, RequestFailedError) and isinstance(e.__cause__, SlowConsumerError):  # the client stalled
        return APIError(408, str(e), "invalid_request_error", "slow_consumer")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), "server_error", type(e).__name__)
    if isinstance(e, InternVLEngineError):
        return APIError(400, str(e), "invalid_request_error", type(e).__name__)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error", "internal_error")


def error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


# ------------------------------------------------------------------------------------------------ request bodies
# A string, or an unterminated one to the end of the body (a lone trailing backslash included): every match
# attempt succeeds, so the scan is linear. Requiring the closing quote made each quote of a hostile body such as
# "\"\"\"... (no closing quote) scan to its end and fail: quadratic (80 KB: 18 s on the event loop).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[list(b"[{")], _BRACKET_STEP[list(b"]}")] = 1, -1


def json_depth_over(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` in the JSON text `raw`, found without parsing it (json's
    parser recurses once per level: a body of nested brackets is a RecursionError, or a deep stack, before any
    check could run). Brackets inside strings do not count; C-speed passes only (a hostile body is 64 MiB)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # every usual body
        return False
    steps = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET), np.uint8)
    depth = 0
    for start in range(0, len(steps), 1 << 20):
        levels = np.cumsum(_BRACKET_STEP[steps[start:start + (1 << 20)]], dtype=np.int64) + depth
        if levels.max() > limit:
            return True
        depth = int(levels[-1])
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes, max_depth: int) -> dict:
    """A request body as a dict, or APIError 400 naming what is wrong: not JSON (NaN and Infinity included, which
    Python's parser would take), nested deeper than max_depth, not an object."""
    too_deep = APIError(400, f"the request body nests arrays and objects deeper than {max_depth} levels "
                             "(--max-json-depth)", code="invalid_json")
    if json_depth_over(raw, max_depth):
        raise too_deep
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # unbalanced brackets the scan cannot pair
        raise too_deep from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# ------------------------------------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share: OpenAI's sampling fields, then vLLM's extras. Unknown fields are ignored, as
    OpenAI clients send some this server has no use for (user, metadata, store, ...)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # OpenAI's API says int64
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    return_token_ids: bool = False  # vLLM's: token_ids (and prompt_token_ids) in each choice
    # vLLM's output constraints, read (and their types checked) by server/structured.py
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None  # read by server/tools.py, which names what is wrong
    parallel_tool_calls: Any = None
    functions: Any = None  # OpenAI's deprecated tool fields: a 400 (server/tools.py)
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: template variables, enable_thinking among them
    _tools: ToolSettings | None = PrivateAttr(None)  # set by chat_sampling_params

    @property
    def tool_settings(self) -> ToolSettings | None:
        """The request's tools as chat_sampling_params read them (None: no tools offered)."""
        return self._tools


class CompletionRequest(_Request):
    # token ids strictly ints: pydantic's lax mode would read true as 1 and 1.0 as 1
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None  # vLLM's completions take it as chat does (server/structured.py)


def _unsupported(what: str, param: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server", code="unsupported", param=param)


def sampling_params(req: _Request, max_tokens: int | None, logprobs: int | None,
                    default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the request's fields under vLLM's names; the engine validates the values.
    temperature defaults to 1.0, as in OpenAI's API (SamplingParams' own default, 0, is greedy)."""
    kw: dict[str, Any] = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
                          "temperature": 1.0 if req.temperature is None else req.temperature}
    try:  # logit_bias, response_format, structured_outputs and guided_* (server/structured.py)
        kw.update(constraint_fields(req))
    except StructuredRequestError as e:
        raise APIError(400, str(e), code="unsupported" if e.unsupported else "SamplingParamsError",
                       param=e.param) from None
    for name in SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.stop:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if logprobs is not None:
        kw["logprobs"] = logprobs
    mm = req.mm_processor_kwargs or {}
    unknown = sorted(set(mm) - set(MM_PROCESSOR_KWARGS))
    if unknown:
        raise APIError(400, f"mm_processor_kwargs: unknown key(s) {unknown}; supported: {sorted(MM_PROCESSOR_KWARGS)}",
                       code="SamplingParamsError", param="mm_processor_kwargs")
    for key, name in MM_PROCESSOR_KWARGS.items():
        if mm.get(key) is not None:
            kw[name] = mm[key]
    try:
        return SamplingParams(**kw)
    except TypeError as e:  # a value of the wrong type that SamplingParams' own checks did not name
        raise SamplingParamsError(f"invalid SamplingParams: {e}") from None


def chat_sampling_params(req: ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    try:
        req._tools = tool_settings(req.tools, req.tool_choice, req.parallel_tool_calls, req.functions,
                                   req.function_call)
    except ToolRequestError as e:
        raise APIError(400, str(e), code="PromptError", param=e.param) from None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, logprobs, default_max_tokens)
    return _with_tool_grammar(params, req._tools)


def _with_tool_grammar(params: SamplingParams, tools: ToolSettings | None) -> SamplingParams:
    """params holding the text to tool_choice required's / a named function's JSON (server/tools.py)."""
    grammar = tools.structured_outputs() if tools is not None else None
    if grammar is None:
        return params
    if params.structured_outputs is not None:
        raise APIError(400, f"tool_choice {tools.choice!r} constrains the output already: it cannot be combined "
                            "with response_format or structured outputs", param="tool_choice")
    return dataclasses.replace(params, structured_outputs=grammar)


def completion_sampling_params(req: CompletionRequest) -> SamplingParams:
    """echo with logprobs asks the engine for the prompt's logprobs too; echo with max_tokens 0 (vLLM's echo without
    generation) runs one token, which the response hides (server/echo.py)."""
    if req.suffix:
        raise _unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise _unsupported("best_of other than n", "best_of")
    nothing = req.echo and req.max_tokens == 0
    params = sampling_params(req, 1 if nothing else req.max_tokens, req.logprobs, 16)  # OpenAI's default: 16 tokens
    if req.echo and req.logprobs is not None:
        params.prompt_logprobs = max(req.logprobs, params.prompt_logprobs or 0)
    return params


def completion_echo(req: CompletionRequest, prompts: list[dict], decode_ids) -> Echo | None:
    """What each choice's text starts with under echo: the prompt as given, or a token prompt's decoded text."""
    if not req.echo:
        return None
    texts = [p["prompt"] if "prompt" in p else decode_ids(p["prompt_token_ids"]) for p in prompts]
    return Echo(texts, generate_nothing=req.max_tokens == 0)


def _texts(prompts: list):
    """(where, text) of every text in normalised conversations (processor.normalize_messages) or raw prompts
    ({"prompt": text})."""
    for pi, p in enumerate(prompts):
        if isinstance(p, dict):
            if "prompt" in p:  # (a prompt of token ids has no text)
                yield f"prompt[{pi}]", p["prompt"]
            continue
        for mi, m in enumerate(p):
            content = m["content"]
            if isinstance(content, str):
                yield f"messages[{mi}].content", content
            else:
                yield from ((f"messages[{mi}].content[{ci}].text", part["text"])
                            for ci, part in enumerate(content) if part["type"] == "text")


def text_chars(prompts: list) -> int:
    """Characters of text in the prompts: what tokenising would cost, measured before anything is tokenised."""
    return sum(len(text) for _, text in _texts(prompts))


def check_unicode(prompts: list) -> None:
    """JSON's \\ud800-style escapes give strings with lone surrogates, which are no text: no tokenizer (nor UTF-8)
    takes them. PromptError naming the first."""
    for where, text in _texts(prompts):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PromptError(f"{where} has a lone surrogate {text[e.start]!r} at character {e.start}: not "
                                  "valid Unicode text") from None


def chat_prompts(req: ChatCompletionRequest) -> list[list[dict]]:
    """The request's one conversation, normalised as LLM.generate normalises it (a malformed message is a
    PromptError here, before any check or queue)."""
    return [normalize_messages(req.messages)]


def completion_prompts(req: CompletionRequest) -> list[dict]:
    """Raw prompts, one per prompt of the request: {"prompt": text} (the text as given, no chat template) or
    {"prompt_token_ids": ids} (OpenAI's token arrays: one list of ints, or a list of them)."""
    prompt = req.prompt
    if not prompt:
        raise APIError(400, "prompt is empty", code="PromptError", param="prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        return [{"prompt": p} for p in ([prompt] if isinstance(prompt, str) else prompt)]
    return [{"prompt_token_ids": list(p)} for p in ([prompt] if isinstance(prompt[0], int) else prompt)]


# ------------------------------------------------------------------------------------------------ responses
def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj) -> str:
    return "data: " + dumps(obj) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _lp(x: float) -> float:
    return x if x > LOGPROB_FLOOR and not math.isnan(x) else LOGPROB_FLOOR


def _token_text(token_id: int, lp, decode) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


def _top(entry: dict, k: int) -> list:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]


def chat_logprobs(token_ids, logprobs, k: int, decode) -> dict:
    """OpenAI chat logprobs: per token its text, logprob, UTF-8 bytes and the top-k alternatives."""
    content = []
    for tid, entry in zip(token_ids, logprobs):
        chosen = entry[tid]
        text = _token_text(tid, chosen, decode)
        content.append({"token": text, "logprob": _lp(chosen.logprob), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (s := _token_text(t, lp, decode)), "logprob": _lp(lp.logprob),
                                          "bytes": list(s.encode())} for t, lp in _top(entry, k)]})
    return {"content": content}


def completion_logprobs(token_ids, logprobs, k: int, decode, offset: int = 0) -> dict:
    """OpenAI (legacy) completions logprobs: tokens, token_logprobs, top_logprobs (text -> logprob), text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs):
        chosen = entry[tid]
        text = _token_text(tid, chosen, decode)
        tokens.append(text)
        token_lps.append(_lp(chosen.logprob))
        tops.append({_token_text(t, lp, decode): _lp(lp.logprob) for t, lp in _top(entry, k)} if k else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(prompt_logprobs) -> list | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token_id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): {"logprob": _lp(lp.logprob), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in e.items()}
            for e in prompt_logprobs]


def usage(outputs) -> dict:
    """Token counts over the RequestOutputs of one HTTP request (a prompt counts once however many samples)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in samples(o))
    cached = sum(o.metrics.cached_prompt_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def samples(out) -> list:
    """The samples (CompletionOutputs) of a RequestOutput."""
    return out.outputs


class ChoiceStream:
    """What one sample has sent so far; turns each cumulative snapshot into the new text, tokens and logprobs.
    parser: its ReasoningParser when the answer's think block goes out as reasoning_content; tools: its ToolParser
    (server/tools.py) when the answer is parsed for tool calls."""
    __slots__ = ("index", "text_sent", "tokens_sent", "finished", "parser", "tools")

    def __init__(self, index: int, parser: ReasoningParser | None = None, tools: ToolParser | None = None):
        self.index, self.text_sent, self.tokens_sent, self.finished = index, 0, 0, False
        self.parser, self.tools = parser, tools

    def advance(self, sample) -> tuple[str, int, str | None] | None:
        """(new text, first new token index, finish reason if it just finished) or None when nothing changed."""
        if self.finished:
            return None
        text = sample.text[self.text_sent:]
        start = self.tokens_sent
        finish = sample.finish_reason
        if not text and len(sample.token_ids) == start and finish is None:
            return None
        self.text_sent = len(sample.text)
        self.tokens_sent = len(sample.token_ids)
        self.finished = finish is not None
        return text, start, finish


class ResponseBuilder:
    """Response bodies and SSE chunks of one HTTP request (chat or completions). reasoning (chat): None to send the
    text as content, else whether the prompt opened a think block (processor.prompt_opens_thinking): the think block
    goes out as reasoning_content (streamed: delta.reasoning_content), as vLLM's reasoning parsers send it."""

    def __init__(self, kind: Literal["chat", "completion"], response_id: str, created: int, model: str,
                 n: int, logprobs: int | None, include_usage: bool, decode, token_ids: bool = False,
                 reasoning: bool | None = None, fingerprint: str | None = None, echo: Echo | None = None,
                 prompt_logprobs: bool = False, tools: ToolSettings | None = None):
        """fingerprint: system_fingerprint; echo (completions): what each prompt's choices begin with;
        prompt_logprobs (completions): whether each choice carries vLLM's prompt_logprobs."""
        self.kind, self.id, self.created, self.model = kind, response_id, created, model
        self.n, self.logprobs, self.include_usage, self.decode = n, logprobs, include_usage, decode
        self.token_ids, self.reasoning, self.tools = token_ids, reasoning, tools  # tools: the request's ToolSettings
        self.fingerprint, self.echo, self.prompt_logprobs = fingerprint, echo, prompt_logprobs
        self._echoed: set[int] = set()  # streamed choices whose prompt has gone out
        self._echo_ends: dict[int, int] = {}  # their generated tokens' first text_offset (echo.end_offset)
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._meta = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                      "system_fingerprint": fingerprint}
        # a chunk is "data: " + head + its choices + tail: the constant parts are encoded once
        self._head = "data: " + dumps(self._meta)[:-1] + ',"choices":'
        self._tail = (',"usage":null' if include_usage else "") + "}\n\n"

    def _logprobs(self, token_ids, lps, offset: int = 0):
        if self.logprobs is None or lps is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(token_ids, lps, self.logprobs, self.decode)
        return completion_logprobs(token_ids, lps, self.logprobs, self.decode, offset)

    # -- whole responses
    def response(self, outputs: list) -> dict:
        """outputs: the final RequestOutput of each prompt (chat: one)."""
        choices = []
        outputs = self._shown(outputs)
        for p, out in enumerate(outputs):
            for c in samples(out):
                index = p * self.n + c.index
                if self.kind == "chat":
                    lps = self._logprobs(c.token_ids, c.logprobs)
                    message, finish = shape_message(self._message(c.text), self.tools, c.finish_reason)
                    choices.append({"index": index, "message": message, "logprobs": lps, "finish_reason": finish})
                else:
                    choices.append(self._completion_choice(index, p, out, c))
                if self.token_ids:
                    choices[-1]["token_ids"] = list(c.token_ids)
                    choices[-1]["prompt_token_ids"] = list(out.prompt_token_ids)
                if self.prompt_logprobs and out.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)  # vLLM: per choice
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, "usage": usage(outputs)}
        if self.kind == "chat" and outputs[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(outputs[0].prompt_logprobs)  # vLLM: beside the choices
        return body

    def _shown(self, outputs: list) -> list:
        """The outputs as the response shows them: echo with max_tokens 0 hides the one token the engine ran."""
        if self.echo is None or not self.echo.generate_nothing:
            return outputs
        return [None if o is None else hide_generation(o) for o in outputs]

    def _completion_choice(self, index: int, p: int, out, c) -> dict:
        """A completions choice; with echo its text (and logprobs) begin with prompt p's."""
        if self.echo is None:
            return {"index": index, "text": c.text, "logprobs": self._logprobs(c.token_ids, c.logprobs),
                    "finish_reason": c.finish_reason}
        head = self.echo.texts[p]
        lps = None
        if self.logprobs is not None and c.logprobs is not None:
            prompt = self._echo_logprobs(out)
            lps = join_logprobs(prompt, self._logprobs(c.token_ids, c.logprobs, echo_end(prompt)))
        return {"index": index, "text": head + c.text, "logprobs": lps, "finish_reason": c.finish_reason}

    def _echo_logprobs(self, out) -> dict:
        return echo_prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids),
                                    self.logprobs, self.decode, completion_logprobs)

    def _message(self, text: str) -> dict:
        if self.reasoning is None:
            return {"role": "assistant", "content": text}
        reasoning, content = split_reasoning(text, self.reasoning)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}

    # -- streams
    def streams(self, prompts: int) -> list[list[ChoiceStream]]:
        """The ChoiceStreams of every sample of every prompt (choice index = prompt * n + sample)."""
        return [[ChoiceStream(p * self.n + j, None if self.reasoning is None else ReasoningParser(self.reasoning),
                              self.tools.parser() if self.tools is not None else None)
                 for j in range(self.n)] for p in range(prompts)]

    def _delta(self, st: ChoiceStream, text: str, finished: bool) -> dict:
        """A chat chunk's delta: the new text as content, or split by the sample's ReasoningParser (which holds a
        possibly cut tag until the next text, or the end, decides it)."""
        if st.parser is None:
            return {"content": text} if text else {}
        reasoning, content = st.parser.feed(text)
        if finished:
            more = st.parser.finish()
            reasoning, content = reasoning + more[0], content + more[1]
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {})}

    def _chunk(self, choices: list) -> str:
        return self._head + dumps(choices) + self._tail

    def role_chunk(self, indices) -> str:
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in indices])

    def chunks(self, out, streams: list[ChoiceStream]) -> list[str]:
        """SSE chunks for what a snapshot adds over the previous ones: one chunk per sample that changed."""
        result = []
        if self.echo is not None:
            out = self._shown([out])[0]
        for c, st in zip(samples(out), streams):
            if self.echo is not None and st.index not in self._echoed:
                result.append(self._echo_chunk(out, st))
            offset = st.text_sent + self._echo_ends.get(st.index, 0)
            change = st.advance(c)
            if change is None:
                continue
            text, start, finish = change
            lps = self._logprobs(c.token_ids[start:], c.logprobs[start:], offset) if c.logprobs is not None else None
            if self.kind == "chat":
                delta = shape_delta(self._delta(st, text, finish is not None), st.tools, finish is not None)
                choice = {"index": st.index, "delta": delta, "logprobs": lps,
                          "finish_reason": tool_finish_reason(finish, st.tools)}
            else:
                choice = {"index": st.index, "text": text, "logprobs": lps, "finish_reason": finish}
            if self.token_ids:
                choice["token_ids"] = list(c.token_ids[start:])
            result.append(self._chunk([choice]))
        return result

    def _echo_chunk(self, out, st: ChoiceStream) -> str:
        """A streamed choice's first chunk under echo: its prompt's text (and logprobs), as vLLM sends it."""
        self._echoed.add(st.index)
        head = self.echo.texts[st.index // self.n]
        lps = self._echo_logprobs(out) if self.logprobs is not None else None
        self._echo_ends[st.index] = echo_end(lps) if lps is not None else 0
        return self._chunk([{"index": st.index, "text": head, "logprobs": lps, "finish_reason": None}])

    def usage_chunk(self, outputs: list) -> str:
        return sse({**self._meta, "choices": [], "usage": usage(self._shown(outputs))})


__all__ = ["APIError", "error_of", "error_body", "ChatCompletionRequest", "CompletionRequest", "sampling_params",
           "chat_sampling_params", "completion_sampling_params", "chat_prompts", "completion_prompts",
           "ResponseBuilder", "ChoiceStream", "sse", "SSE_DONE", "dumps", "usage", "samples",
           "SamplingParamsError"]
