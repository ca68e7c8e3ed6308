"""Request fields this server does not implement and whose value would change the answer: a 400 naming the field,
never a silent drop (the request models ignore unknown fields, as OpenAI clients send some with no bearing on the
output: user, metadata, store, service_tier, prediction (a latency hint), prompt_cache_key, safety_identifier,
priority, cache_salt). Each entry lists the values that ask for nothing beyond what the server does; null counts as
absent. Tool and structured-output fields are read by their own modules (tools.py, the structured outputs)."""
from __future__ import annotations

from .protocol import APIError, ChatCompletionRequest, CompletionRequest

_ANY = ()  # every value asks for something unimplemented

# vLLM's sampling extras, on both endpoints
_BOTH = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "truncate_prompt_tokens": _ANY,
    "allowed_token_ids": _ANY,
    "bad_words": ([],),
    "logits_processors": _ANY,
    "return_tokens_as_token_ids": (False,),
    "prompt_embeds": _ANY,
    "vllm_xargs": _ANY,
    "spaces_between_special_tokens": (True,),
}
# OpenAI's chat fields for other modalities, tools and reasoning controls; vLLM's chat template extras
_CHAT = {
    **_BOTH,
    "modalities": (["text"],),
    "audio": _ANY,
    "web_search_options": _ANY,
    "reasoning_effort": _ANY,
    "verbosity": _ANY,
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "documents": _ANY,
    "chat_template": _ANY,
}
_COMPLETION = dict(_BOTH)


def refuse_unimplemented(model: type, body: dict) -> None:
    """APIError 400 (code "unsupported", param the field) for the first field of `body` that asks a generation
    request (`model`: its request class) for something this server does not do."""
    table = _CHAT if issubclass(model, ChatCompletionRequest) else \
        _COMPLETION if issubclass(model, CompletionRequest) else {}
    for name, allowed in table.items():
        value = body.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise APIError(400, f"{name}={_short(value)} is not supported by this server", code="unsupported",
                           param=name)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
