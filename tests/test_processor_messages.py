"""The one message normaliser (processor/messages.py) that LLM, AsyncLLM and the server share: the engine's
content items and OpenAI's content parts read alike, a normalised conversation reads as itself, and whatever is
malformed is a PromptError naming its place. CPU only, no model."""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest
import torch

from internvl_engine.errors import PromptError
from internvl_engine.processor import Processor
from internvl_engine.processor.files import write_processor_files
from internvl_engine.processor.messages import normalize_messages, split_media


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    write_processor_files(d)
    return Processor.from_pretrained(d)


def _png_uri(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _openai(image_a: str, image_b: str, video: str) -> list[dict]:
    return [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ada", "content": [
            {"type": "image_url", "image_url": {"url": image_a, "detail": "high"}},  # the model's tiling: no key
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": image_b},
            {"type": "video_url", "video_url": {"url": video}},
            {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": None},
    ]


def _engine(image_a: str, image_b: str, video: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ada", "content": [
            {"type": "image", "url": image_a}, "and", {"type": "image", "image": image_b},
            {"type": "video", "path": video}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": ""},
    ]


def _without_video(conversation: list[dict]) -> list[dict]:
    return [{**m, "content": [p for p in m["content"] if isinstance(p, str) or "video" not in p["type"]]}
            if isinstance(m["content"], list) else m for m in conversation]


def test_openai_parts_read_as_engine_items():
    a, b = _png_uri(1), _png_uri(2)
    openai_form = normalize_messages(_openai(a, b, "/clips/v.mp4"))
    assert openai_form == normalize_messages(_engine(a, b, "/clips/v.mp4"))
    assert openai_form == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ada", "content": [
            {"type": "image", "image": a}, {"type": "text", "text": "and"}, {"type": "image", "image": b},
            {"type": "video", "video": "/clips/v.mp4"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": ""},
    ]
    assert normalize_messages(openai_form) == openai_form  # the server's normalised messages reach the engine


def test_bare_base64_and_sources_left_to_the_caller():
    payload = _png_uri(3).partition(",")[2]
    conv = normalize_messages([{"role": "user", "content": [{"type": "image", "base64": payload},
                                                             {"type": "image"}, {"type": "video"}]}])
    assert conv[0]["content"] == [{"type": "image", "image": "data:image/png;base64," + payload},
                                  {"type": "image", "image": None}, {"type": "video", "video": None}]


def test_split_media_hides_sources_from_the_template():
    a = _png_uri(4)
    rendered, media = split_media(normalize_messages(_openai(a, "b.png", "v.mp4")))
    assert media == [("image", a), ("image", "b.png"), ("video", "v.mp4")]
    assert a not in repr(rendered) and "v.mp4" not in repr(rendered)
    assert [item["type"] for item in rendered[1]["content"]] == ["image", "text", "image", "video", "text"]


def test_llm_reads_openai_messages_as_its_own(ours):
    """The processor (what LLM.generate and AsyncLLM run) encodes OpenAI's parts exactly as its own items."""
    a, b = _png_uri(5), _png_uri(6)
    openai_enc = ours(_without_video(_openai(a, b, "")), max_num_tiles=2)
    engine_enc = ours(_without_video(_engine(a, b, "")), max_num_tiles=2)
    assert openai_enc.input_ids == engine_enc.input_ids and openai_enc.prompt == engine_enc.prompt
    assert torch.equal(openai_enc.pixel_values, engine_enc.pixel_values)
    assert openai_enc.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("bad, match", [
    ("hi", r"conversation must be a list of messages, got str"),
    ([["user", "hi"]], r"messages\[0\] must be a dict with 'role' and 'content', got list"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "function", "content": "x"}],
     r"messages\[1\]\.role must be system, developer, user, assistant or tool, got 'function'"),
    ([{"role": ["user"], "content": "x"}], r"messages\[0\]\.role must be .*, got \['user'\]"),
    ([{"role": "user", "content": 7}], r"messages\[0\]\.content must be a string or a list of parts, got int"),
    ([{"role": "user", "content": ["a", 7]}], r"messages\[0\]\.content\[1\] must be a string or a dict, got int"),
    ([{"role": "user", "content": [{"type": "text", "text": ["no"]}]}],
     r"messages\[0\]\.content\[0\]: 'text' must be a string, got list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     r"messages\[0\]\.content\[0\]\.image_url\.url must be a non-empty string"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": ""}}]}],
     r"messages\[0\]\.content\[0\]\.video_url\.url must be a non-empty string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ["a.png"]}}]}],
     r"image_url\.url must be a non-empty string"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}],
     r"messages\[0\]\.content\[0\] has unknown type 'input_audio'; supported: text, image, image_url, video"),
])
def test_malformed_messages_name_their_place(bad, match):
    with pytest.raises(PromptError, match=match):
        normalize_messages(bad)
