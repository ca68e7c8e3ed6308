"""The tokenizer's routes in vLLM's shapes, and the checks of prompts given as token ids.

POST /tokenize {"prompt": str} or {"messages": [...], "add_generation_prompt"?, "chat_template_kwargs"?,
"mm_processor_kwargs"?}, either with "model"?, "add_special_tokens"?, "return_token_strs"? -> {"count",
"max_model_len", "tokens", "token_strs"?}. A conversation is encoded exactly as a chat request's prompt: its images
and videos are read under the server's media policy and expanded to the placeholder tokens the model reads (a
448-pixel tile is 256 of them), so `count` is the usage.prompt_tokens of the same chat request. A prompt is the
text alone through the tokenizer, as completions encode it. The InternVL tokenizers add no special tokens (Qwen2 and
Qwen3 have no BOS), so add_special_tokens changes nothing and is accepted either way.

POST /detokenize {"model"?, "tokens": [int]} -> {"prompt": text}, special tokens kept (vLLM's, and HF's decode
default). GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer reads (eos_token, chat_template, ...).

`tools` are rendered into the prompt as a chat request renders them (server/tools.py). Fields that would change the
result and are not implemented (continue_final_message true, chat_template) are a 400 naming them; unknown fields
too (this API is small enough that a misspelt field is a client's mistake)."""
from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from . import protocol as P
from .tools import ToolRequestError, template_variables, tool_settings

# mm_processor_kwargs a tokenize request takes, as chat requests do (protocol.MM_PROCESSOR_KWARGS)
_TILES = "max_dynamic_patch"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    tools: list | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def check_token_prompts(prompts: list[dict], vocab: int, max_model_len: int) -> None:
    """APIError 400 naming `prompt` for a prompt of token ids the engine would refuse: empty, an id outside the
    model's vocabulary, or no room left in the context (the engine checks again; this names the field)."""
    for i, p in enumerate(prompts):
        ids = p.get("prompt_token_ids")
        if ids is None:
            continue
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not ids:
            raise P.APIError(400, f"{where} is an empty list of token ids", code="PromptError", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.APIError(400, f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab})",
                             code="PromptError", param="prompt")
        if len(ids) >= max_model_len:
            raise P.APIError(400, f"{where} has {len(ids)} tokens but the model's context is {max_model_len} tokens "
                                  "(max_model_len)", code="PromptError", param="prompt")


def _refuse_unimplemented(req: TokenizeRequest) -> None:
    if (req.prompt is None) == (req.messages is None):
        raise P.APIError(400, "give either prompt (a text) or messages (a conversation)",
                         param="prompt" if req.prompt is None else "messages")
    if req.continue_final_message:
        raise P.APIError(400, "continue_final_message is not supported by this server", code="unsupported",
                         param="continue_final_message")
    if req.chat_template is not None:
        raise P.APIError(400, "chat_template is not supported by this server", code="unsupported",
                         param="chat_template")
    if req.prompt is not None:
        for name in ("chat_template_kwargs", "mm_processor_kwargs", "tools"):
            if getattr(req, name) is not None:
                raise P.APIError(400, f"{name} applies to messages, not to a prompt", param=name)
    unknown = sorted(set(req.mm_processor_kwargs or {}) - {_TILES})
    if unknown:
        raise P.APIError(400, f"mm_processor_kwargs: unknown key(s) {unknown}; supported: ['{_TILES}']",
                         param="mm_processor_kwargs")


def _variables(req: TokenizeRequest) -> dict | None:
    """The chat template's variables, the offered tools among them, as a chat request's (server/tools.py)."""
    try:
        return template_variables(req.chat_template_kwargs, tool_settings(req.tools, None, None))
    except ToolRequestError as e:
        raise P.APIError(400, str(e), code="PromptError", param=e.param) from None


def _encode_messages(processor, req: TokenizeRequest, prompts: list, variables: dict | None) -> list[int]:
    """The ids a chat request with these messages feeds the model (template, media placeholders expanded)."""
    raw = processor.render_request(prompts[0], variables, req.add_generation_prompt)
    tiles = (req.mm_processor_kwargs or {}).get(_TILES)
    return processor(text=raw["prompt"], images=raw["images"], videos=raw["videos"], max_num_tiles=tiles).input_ids


async def tokenize(server, body: dict) -> dict:
    """The /tokenize answer; APIError or the engine's typed errors (400) for bad input."""
    req = server.parse(TokenizeRequest, body)
    server.check_model(req.model)
    _refuse_unimplemented(req)
    engine = server.llm.engine
    tokenizer = engine.processor.tokenizer
    # off the event loop, as the engine's intake: tokenising takes about a second a megabyte, and a conversation's
    # media are read and decoded (file, URL, pixels)
    loop = asyncio.get_running_loop()
    if req.prompt is not None:
        server.check_size([{"prompt": req.prompt}], "prompt")
        ids = await loop.run_in_executor(None, tokenizer.encode, req.prompt)
    else:
        prompts = P.chat_prompts(req)
        server.check_size(prompts, "messages")
        ids = await loop.run_in_executor(None, _encode_messages, engine.processor, req, prompts, _variables(req))
    answer = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": list(ids)}
    if req.return_token_strs:
        answer["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
    return answer


def detokenize(server, body: dict) -> dict:
    req = server.parse(DetokenizeRequest, body)
    server.check_model(req.model)
    tokenizer = server.llm.engine.processor.tokenizer
    size = tokenizer.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < size), None)
    if bad is not None:
        raise P.APIError(400, f"tokens: id {bad} is outside the tokenizer's vocabulary [0, {size})",
                         code="PromptError", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}


def tokenizer_info(server) -> dict:
    """vLLM's GET /tokenizer_info fields that a client of it reads (lm-evaluation-harness's remote tokenizer: its
    eos_token, and the chat template it renders itself)."""
    engine = server.llm.engine
    tokenizer = engine.processor.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
            "eos_token": tokenizer.id_to_token(tokenizer.eos_token_id),
            "pad_token": tokenizer.id_to_token(tokenizer.pad_token_id),
            "model_max_length": engine.max_model_len, "chat_template": engine.processor.template.source}
