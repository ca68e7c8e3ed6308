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
    # as transformers renders it with the same variable (apply_chat_template's extra kwargs)
    from transformers.utils.chat_template_utils import render_jinja_template
    conv = [{"role": "user", "content": [{"type": "text", "text": "Which is larger?"}]}]
    for thinking in (True, False):
        (reference,), _ = render_jinja_template(conversations=[conv], chat_template=SWITCH_TEMPLATE,
                                                add_generation_prompt=True, enable_thinking=thinking)
        assert p.apply_chat_template(conv, chat_template_kwargs={"enable_thinking": thinking}) == reference


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
THINKING_MODEL = "random:tiny-qwen3"  # a Qwen3-decoder InternVL: InternVL3.5's thinking switch


@pytest.fixture(scope="module")
def llm():
    return LLM(THINKING_MODEL, device="cpu", kv_cache_tokens=4096)


def test_llm_generate_takes_chat_template_kwargs(llm):
    params = SamplingParams(max_tokens=2)
    assert llm.processor.thinking_mode == "system_prompt"
    conv = [{"role": "user", "content": "Which is larger, 9.11 or 9.8?"}]
    on, off = llm.generate([conv, conv], params, chat_template_kwargs={"enable_thinking": True}), \
        llm.generate(conv, params)
    explicit = llm.generate([{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *conv], params)
    assert on[0].prompt_token_ids == on[1].prompt_token_ids == explicit[0].prompt_token_ids
    assert on[0].token_ids == explicit[0].token_ids
    assert off[0].prompt_token_ids == llm.processor(conv).input_ids != on[0].prompt_token_ids
    streamed = llm.stream(conv, params, chat_template_kwargs={"enable_thinking": True})
    assert "".join(streamed) == on[0].text and streamed.output.prompt_token_ids == on[0].prompt_token_ids
    assert llm.prompt_logits(conv, chat_template_kwargs={"enable_thinking": True}).shape[0] == \
        len(on[0].prompt_token_ids)
    with pytest.raises(PromptError, match="not to a raw prompt"):
        llm.generate({"prompt": "hi"}, params, chat_template_kwargs={"enable_thinking": True})


# ------------------------------------------------------------------------------------------------ the server
SCRIPT = ["<thi", "nk>\nThe user", " greets.</th", "ink>", "\n\nHel", "lo!"]  # one piece per generated token


def scripted_server(model: str, **settings):
    """An AsyncLLM whose outputs carry a scripted text (state["script"], one piece per generated token, so the tags
    arrive cut across stream chunks), and a server over it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from test_server import ThreadServer

    from internvl_engine.engine.async_llm import AsyncLLM
    from internvl_engine.server import ServerSettings

    settings = ServerSettings(model_name=MODEL, **settings)
    llm = AsyncLLM(model, device="cpu", kv_cache_tokens=4096, media_policy=settings.media_policy())
    state = {"script": SCRIPT}
    real = llm.generate

    def scripted(out, tokens: int | None = None):
        """out with each sample's text the script's first pieces; with tokens, out as it stood after that many."""
        cut = (lambda c: c) if tokens is None else (
            lambda c: dataclasses.replace(c, token_ids=c.token_ids[:tokens], finish_reason=None))
        samples = [cut(c) for c in out.outputs]
        samples = [dataclasses.replace(c, text="".join(state["script"][:len(c.token_ids)])) for c in samples]
        return dataclasses.replace(out, text=samples[0].text, token_ids=samples[0].token_ids,
                                   finish_reason=samples[0].finish_reason, outputs=samples)

    async def generate(conversation, params=None, request_id=None):
        inner = real(conversation, params, request_id)
        yielded = 0
        try:
            async for out in inner:
                # AsyncLLM coalesces the outputs a slow consumer has not read (by design), so on a loaded machine
                # several tokens arrive as one output; a single sample is replayed token by token so that the
                # server sees every piece of the script as its own output whatever the timing.
                if len(out.outputs) == 1:
                    for tokens in range(yielded + 1, len(out.outputs[0].token_ids)):
                        yield scripted(out, tokens)
                    yielded = len(out.outputs[0].token_ids)
                yield scripted(out)
        finally:
            await inner.aclose()

    llm.generate = generate
    return ThreadServer(llm, settings), state


@pytest.fixture(scope="module")
def served():
    """InternVL3 (no thinking mode) under --reasoning-parser think: the think block split whatever the model."""
    srv, state = scripted_server(MODEL, reasoning_parser="think")
    yield srv, state
    srv.stop()
    srv.llm.shutdown()


def chat(srv, stream: bool, max_tokens: int, **kw):
    return srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens, temperature=0,
        stream=stream, extra_body={"ignore_eos": True, **kw})


def streamed(response) -> list[tuple[str | None, str | None, str | None]]:
    """(reasoning_content, content, finish_reason) of each chunk after the role chunk."""
    chunks = [(getattr(c.choices[0].delta, "reasoning_content", None), c.choices[0].delta.content,
               c.choices[0].finish_reason) for c in response if c.choices]
    assert chunks[0][:2] == (None, "")  # the role chunk
    return chunks[1:]


def test_server_reasoning_content(served):
    srv, state = served
    state["script"] = SCRIPT
    msg = chat(srv, False, len(SCRIPT)).choices[0].message
    assert (msg.reasoning_content, msg.content) == ("\nThe user greets.", "\n\nHello!")
    chunks = streamed(chat(srv, True, len(SCRIPT)))
    reasoning = [r for r, _, _ in chunks if r]
    assert "".join(reasoning) == "\nThe user greets." and len(reasoning) >= 2  # sent as it came, not at the end
    assert "".join(c for _, c, _ in chunks if c) == "\n\nHello!"
    last_reasoning = max(i for i, (r, _, _) in enumerate(chunks) if r)
    assert all(not c for _, c, _ in chunks[:last_reasoning + 1]) and chunks[-1][2] == "length"
    # n samples: each its own parser
    both = chat(srv, False, len(SCRIPT), n=2, seed=1)
    assert [(c.message.reasoning_content, c.message.content) for c in both.choices] == \
        [("\nThe user greets.", "\n\nHello!")] * 2
    per_choice = {0: ["", ""], 1: ["", ""]}
    for c in chat(srv, True, len(SCRIPT), n=2, seed=1):
        for choice in c.choices:
            per_choice[choice.index][0] += getattr(choice.delta, "reasoning_content", None) or ""
            per_choice[choice.index][1] += choice.delta.content or ""
    assert per_choice == {0: ["\nThe user greets.", "\n\nHello!"], 1: ["\nThe user greets.", "\n\nHello!"]}


def test_server_unterminated_thinking_is_all_reasoning(served):
    srv, state = served
    state["script"] = SCRIPT
    r = chat(srv, False, 3)
    assert r.choices[0].finish_reason == "length"
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("\nThe user greets.</th", None)
    chunks = streamed(chat(srv, True, 3))
    assert "".join(r for r, _, _ in chunks if r) == "\nThe user greets.</th"  # the cut tag, flushed at the end
    assert not any(c for _, c, _ in chunks)


def test_server_thinking_on_a_model_without_it_is_400(served):
    import openai
    srv, state = served
    with pytest.raises(openai.BadRequestError, match="no thinking mode"):
        chat(srv, False, 2, chat_template_kwargs={"enable_thinking": True})
    state["script"] = ["plain", " answer"]
    msg = chat(srv, False, 2, chat_template_kwargs={"enable_thinking": False}).choices[0].message
    assert (msg.reasoning_content, msg.content) == (None, "plain answer")


def test_server_template_switch_and_parser_choice(served):
    """A template with the switch: enable_thinking reaches it, and the think block its prompt opens makes a lone
    </think> end the reasoning. --reasoning-parser auto splits only for a model with a thinking mode; none never."""
    from test_server import ThreadServer

    from internvl_engine.server import ServerSettings, build_app
    from internvl_engine.settings import EngineConfigError

    srv, state = served
    llm, proc = srv.llm, srv.llm.engine.processor
    assert build_app(llm, ServerSettings(model_name=MODEL)).state.server.split_reasoning is False  # qwen2, no switch
    with pytest.raises(EngineConfigError, match="reasoning_parser"):
        build_app(llm, ServerSettings(model_name=MODEL, reasoning_parser="bogus"))
    saved = proc.template
    proc.template = ChatTemplate(SWITCH_TEMPLATE)
    auto = ThreadServer(llm, ServerSettings(model_name=MODEL))
    plain = ThreadServer(llm, ServerSettings(model_name=MODEL, reasoning_parser="none"))
    try:
        assert auto.app.state.server.split_reasoning
        state["script"] = ["weigh", " it</think>", "\n\n9.8"]
        on = chat(auto, False, 3, chat_template_kwargs={"enable_thinking": True})
        assert (on.choices[0].message.reasoning_content, on.choices[0].message.content) == ("weigh it", "\n\n9.8")
        chunks = streamed(chat(auto, True, 3, chat_template_kwargs={"enable_thinking": True}))
        assert "".join(r for r, _, _ in chunks if r) == "weigh it" and \
            "".join(c for _, c, _ in chunks if c) == "\n\n9.8"
        state["script"] = ["9.8", " is larger."]
        off = chat(auto, False, 2, chat_template_kwargs={"enable_thinking": False})
        assert (off.choices[0].message.reasoning_content, off.choices[0].message.content) == (None, "9.8 is larger.")
        # the closed empty block ("<think>\n\n</think>\n\n" after "<think>\n") is what the prompt tokens grew by
        tok = proc.tokenizer
        assert off.usage.prompt_tokens - on.usage.prompt_tokens == \
            len(tok.encode("<think>\n\n</think>\n\n")) - len(tok.encode("<think>\n"))
        state["script"] = SCRIPT
        kept = chat(plain, False, len(SCRIPT)).choices[0].message
        assert kept.content == "".join(SCRIPT) and getattr(kept, "reasoning_content", None) is None
    finally:
        auto.stop()
        plain.stop()
        proc.template = saved


def test_server_internvl3_5_thinks_on_request():
    """A Qwen3-decoder model under the default --reasoning-parser auto: enable_thinking puts its thinking system
    prompt before the conversation, and the answer's think block comes back as reasoning_content."""
    srv, state = scripted_server(THINKING_MODEL)
    try:
        assert srv.app.state.server.split_reasoning
        on = chat(srv, False, len(SCRIPT), chat_template_kwargs={"enable_thinking": True})
        assert (on.choices[0].message.reasoning_content, on.choices[0].message.content) == \
            ("\nThe user greets.", "\n\nHello!")
        state["script"] = ["Hello", "!"]
        off = chat(srv, False, 2)
        assert (off.choices[0].message.reasoning_content, off.choices[0].message.content) == (None, "Hello!")
        proc = srv.llm.engine.processor
        conv = [{"role": "user", "content": "Hi"}]
        assert on.usage.prompt_tokens == len(proc(conv).input_ids) + \
            len(proc.tokenizer.encode("<|im_start|>system\n" + THINKING_SYSTEM_PROMPT + "<|im_end|>\n"))
        assert off.usage.prompt_tokens == len(proc(conv).input_ids)
    finally:
        srv.stop()
        srv.llm.shutdown()
