"""Thinking mode: the chat template's switch (chat_template_kwargs.enable_thinking) as InternVL3.5 takes it (its
thinking system prompt), as a template that reads the variable takes it, refused by a model without one; the
reasoning parser (whole and streamed in every cut, the tag cases vLLM's parsers handle); LLM.generate with
chat_template_kwargs; the server's reasoning_content, streamed and not, through the official openai client. A
random-weight model writes no think tags, so the server tests script the engine's output text."""
from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest

from internvl_engine import LLM, SamplingParams
from internvl_engine.config import ModelConfig, TextConfig
from internvl_engine.errors import PromptError
from internvl_engine.processor import (THINKING_SYSTEM_PROMPT, ChatTemplate, Processor, ReasoningParser,
                                       prompt_opens_thinking, split_reasoning)
from internvl_engine.processor.template import DEFAULT_CHAT_TEMPLATE

MODEL = "random:tiny"
CONV = [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "Which is larger?"}]}]
SYSTEM = "<|im_start|>system\n" + THINKING_SYSTEM_PROMPT + "<|im_end|>\n"
# a Qwen3-style template: the generation prompt opens a think block unless enable_thinking is false, which closes it
# empty (the form of Qwen3's own templates)
SWITCH_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}")


@functools.lru_cache(maxsize=None)
def tokenizer():
    return Processor.from_parts().tokenizer  # (building the tokenizer takes seconds: once)


def processor(model_type: str, template: str | None = None) -> Processor:
    return Processor.from_parts(tokenizer(), template, model_config=ModelConfig(text=TextConfig(model_type=model_type)))


# ------------------------------------------------------------------------------------------------ the switch
def test_internvl3_5_thinking_is_its_system_prompt():
    p = processor("qwen3")
    assert p.thinking_mode == "system_prompt"
    off = p.apply_chat_template(CONV)
    assert p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": False}) == off
    on = p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": True})
    assert on == SYSTEM + off  # exactly the model card's switch: its system prompt as the first message
    assert THINKING_SYSTEM_PROMPT.startswith("You are an AI assistant that rigorously follows this response protocol")
    assert "within <think> and </think> tags" in THINKING_SYSTEM_PROMPT
    explicit = [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *CONV]
    assert on == p.apply_chat_template(explicit)
    with pytest.raises(PromptError, match="already has a system message"):
        p.apply_chat_template(explicit, chat_template_kwargs={"enable_thinking": True})
    assert p.apply_chat_template(explicit, chat_template_kwargs={"enable_thinking": False}) == on


def test_a_template_with_the_switch_gets_it():
    p = processor("qwen2", SWITCH_TEMPLATE)
    assert p.thinking_mode == "template"
    on = p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": True})
    off = p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": False})
    assert on.endswith("<|im_start|>assistant\n<think>\n") and prompt_opens_thinking(on)
    assert off == on[:-len("<think>\n")] + "<think>\n\n</think>\n\n" and not prompt_opens_thinking(off)
    assert p.apply_chat_template(CONV) == on  # the template's own default
    assert SYSTEM not in on  # the template switches; no system prompt is added


def test_a_model_without_thinking_refuses_it():
    p = processor("qwen2")
    assert p.thinking_mode is None
    with pytest.raises(PromptError, match="no thinking mode.*'qwen2'"):
        p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": True})
    assert p.apply_chat_template(CONV, chat_template_kwargs={"enable_thinking": False}) == p.apply_chat_template(CONV)


def test_other_template_variables_and_bad_ones():
    p = processor("qwen2", DEFAULT_CHAT_TEMPLATE + "{{ note | default('') }}")
    assert p.apply_chat_template(CONV, chat_template_kwargs={"note": "N"}).endswith("assistant\nN")
    assert p.apply_chat_template(CONV, chat_template_kwargs={"unread": 1}) == p.apply_chat_template(CONV)
    for bad, match in (({"enable_thinking": "yes"}, "true or false"), ({"messages": []}, "may not set"),
                       ({"add_generation_prompt": False}, "may not set"), ([("a", 1)], "dict of variable names")):
        with pytest.raises(PromptError, match=match):
            processor("qwen3").apply_chat_template(CONV, chat_template_kwargs=bad)


def test_render_request_encodes_as_the_conversation():
    """The raw request a front end sends the engine encodes to the same ids and pixels as the conversation."""
    import numpy as np
    p = processor("qwen3")
    rng = np.random.default_rng(0)
    conv = [{"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (40, 60, 3), np.uint8)},
                                         "Describe it."]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (30, 30, 3), np.uint8)},
                                         "And this?"]}]
    raw = p.render_request(conv)
    a, b = p(conv), p(text=raw["prompt"], images=raw["images"], videos=raw["videos"])
    assert a.input_ids == b.input_ids and (a.pixel_values == b.pixel_values).all()
    thinking = p.render_request(conv, {"enable_thinking": True})
    assert thinking["prompt"] == SYSTEM + raw["prompt"] and len(thinking["images"]) == 2


# ------------------------------------------------------------------------------------------------ the parser
CASES = [
    # (output text, prompt opened a think block, reasoning, content)
    ("<think>\nweigh both\n</think>\n\n9.8 is larger.", False, "\nweigh both\n", "\n\n9.8 is larger."),
    ("\n <think>r</think>c", False, "r", "c"),  # whitespace before the block is dropped (vLLM drops what precedes)
    ("just an answer", False, None, "just an answer"),
    ("an answer that mentions </think> late", False, None, "an answer that mentions </think> late"),
    ("<think>unterminated at max_tokens</thi", False, "unterminated at max_tokens</thi", None),
    ("<think>r</think>", False, "r", None),
    ("<think>a</think>b<think>c</think>d", False, "a", "b<think>c</think>d"),  # a second block is content
    ("<thinker>", False, None, "<thinker>"),
    ("reasoning only, the template opened it</think>answer", True, "reasoning only, the template opened it",
     "answer"),
    ("still thinking", True, "still thinking", None),
    ("", False, None, ""),
    ("  ", False, None, "  "),
]


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_split_reasoning(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_streamed_in_any_cut_equals_whole(text, opened, reasoning, content):
    """Tags cut anywhere between two pieces (three cuts, every place) give what the whole text gives."""
    for cuts in itertools.combinations(range(len(text) + 1), min(3, len(text) + 1)):
        parser = ReasoningParser(opened)
        pieces = [text[i:j] for i, j in zip((0, *cuts), (*cuts, len(text)))]
        got = [parser.feed(piece) for piece in pieces] + [parser.finish()]
        assert "".join(r for r, _ in got) == (reasoning or "")
        assert "".join(c for _, c in got) == (content or "")


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ LLM
@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, device="cpu", kv_cache_tokens=4096)


def test_llm_generate_takes_chat_template_kwargs(llm):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(PromptError, match="no thinking mode"):
        llm.generate(CONV[0]["content"][1]["text"], params, chat_template_kwargs={"enable_thinking": True})
    proc = llm.processor
    saved = proc.model_config
    proc.model_config = dataclasses.replace(saved, text=dataclasses.replace(saved.text, model_type="qwen3"))
    try:  # the processor of an InternVL3.5 checkpoint (a qwen3 decoder); the weights play no part in the prompt
        conv = [{"role": "user", "content": "Which is larger, 9.11 or 9.8?"}]
        on, off = llm.generate([conv, conv], params, chat_template_kwargs={"enable_thinking": True}), \
            llm.generate(conv, params)
        explicit = llm.generate([{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *conv], params)
        assert on[0].prompt_token_ids == on[1].prompt_token_ids == explicit[0].prompt_token_ids
        assert on[0].token_ids == explicit[0].token_ids
        assert off[0].prompt_token_ids == proc(conv).input_ids != on[0].prompt_token_ids
        streamed = llm.stream(conv, params, chat_template_kwargs={"enable_thinking": True})
        assert "".join(streamed) == on[0].text and streamed.output.prompt_token_ids == on[0].prompt_token_ids
        assert llm.prompt_logits(conv, chat_template_kwargs={"enable_thinking": True}).shape[0] == \
            len(on[0].prompt_token_ids)
        with pytest.raises(PromptError, match="not to a raw prompt"):
            llm.generate({"prompt": "hi"}, params, chat_template_kwargs={"enable_thinking": True})
    finally:
        proc.model_config = saved
