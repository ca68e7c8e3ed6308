"""Processor parity with transformers 5.24 InternVLProcessor (PIL image backend, torchvision video backend). CPU only."""

from __future__ import annotations

import base64
import io
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hf_processor import make_hf_processor  # noqa: E402

from internvl_engine.errors import ImageError, InternVLEngineError, PromptError, VideoError  # noqa: E402
from internvl_engine.processor import (  # noqa: E402
    IncrementalDetokenizer,
    Processor,
    load_image,
    sample_frame_indices,
    to_rgb_array,
)
from internvl_engine.processor.files import write_processor_files  # noqa: E402
from internvl_engine.processor.images import select_grid  # noqa: E402
from internvl_engine.processor.template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template  # noqa: E402

IMAGE_TOKEN = "<IMG_CONTEXT>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    write_processor_files(d)
    return d


@pytest.fixture(scope="module")
def hf(ckpt):
    return make_hf_processor(ckpt)


@pytest.fixture(scope="module")
def ours(ckpt):
    return Processor.from_pretrained(ckpt)


def _hf_call(hf, prompt, images=None, videos=None, **kw):
    out = hf(text=prompt, images=images, videos=videos, return_tensors="pt", **kw)
    pv = out.get("pixel_values")
    return out["input_ids"][0].tolist(), pv


def _assert_same(enc, hf_ids, hf_pv):
    assert enc.input_ids == hf_ids
    if hf_pv is None:
        assert enc.pixel_values is None
        return
    assert enc.pixel_values.dtype == torch.float32
    assert tuple(enc.pixel_values.shape) == tuple(hf_pv.shape)
    assert (enc.pixel_values - hf_pv.float()).abs().max().item() <= 1e-6


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_facts(ours, hf):
    tok = ours.tokenizer
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.encode("Describe this image in detail.") == [74785, 419, 2168, 304, 7716, 13]
    assert tok.encode("Write a haiku.") == [7985, 264, 6386, 38242, 13]
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    names = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
    assert [tok.token_to_id(n) for n in names] == list(range(151665, 151675))
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.image_token_id) == (151665, 151666, 151667)
    assert tok.video_token == "<video>"
    assert tok.vocab_size == 151675 == len(hf.tokenizer)
    assert tok.model_max_length == 8192

    texts = [
        "Hello, world!",
        "  leading spaces and trailing  \n\n",
        "中文测试：你好，世界！这是一个图像。",
        "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧 family",
        "<|im_start|>user\n<IMG_CONTEXT>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        "inline<img></img><ref>obj</ref><box>[[1,2,3,4]]</box><quad></quad><video>x",
        "numbers 1234567890 3.14159 and code: def f(x): return x**2\t# tab",
        "Ｆｕｌｌwidth ＡＢＣ and café naïve (NFC é vs e\u0301)",
        "a<|endoftext|>b<|im_end|>c<tool_call>d</tool_call>",
        "Frame1: <img><IMG_CONTEXT></img>\nFrame2: ",
        "",
        "\u00a0\u2003mixed\u3000spaces",
    ]
    for t in texts:
        assert tok.encode(t) == hf.tokenizer(t, add_special_tokens=True)["input_ids"], t
        assert tok.decode(tok.encode(t), skip_special_tokens=False) == hf.tokenizer.decode(
            hf.tokenizer(t)["input_ids"], skip_special_tokens=False
        )
        ids = tok.encode(t)
        assert tok.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer(ours):
    tok = ours.tokenizer
    rng = np.random.default_rng(0)
    base = tok.encode("中文测试 😀🎉 naïve café ½ ✓ ∑ 日本語テキスト 한국어 <|im_end|> <img>")
    multibyte_ids = [i for i in range(151643) if "\ufffd" in tok.decode([i])]
    for trial in range(60):
        n = int(rng.integers(1, 60))
        pool = base + multibyte_ids[:5000] if trial % 2 else base
        ids = [int(pool[k]) for k in rng.integers(0, len(pool), n)]
        for skip in (True, False):
            det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            out, i = [], 0
            while i < len(ids):
                step = int(rng.integers(1, 4))
                out.append(det.add(ids[i : i + step]))
                i += step
            out.append(det.flush())
            assert "".join(out) == tok.decode(ids, skip_special_tokens=skip)
    # valid text streamed token by token: never emits a partial character
    ids = tok.encode("流式输出 😀👍🏽 test ✓ 终")
    det = IncrementalDetokenizer(tok)
    deltas = [det.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert det.flush() == ""


# ------------------------------------------------------------------ grid and sampling


def test_select_grid_matches_hf():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 300), (300, 1), (448, 448), (449, 448), (896, 448), (2, 2000), (3000, 1000), (224, 224)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(120)]
    for max_t in range(1, 25):
        for min_t in sorted({1, 2, 3, max_t}):
            if min_t > max_t:
                continue
            for w, h in sizes:
                assert select_grid(w, h, min_t, max_t, 448) == get_optimal_tiled_canvas((h, w), (448, 448), min_t, max_t)


def test_sample_frame_indices_match_hf(hf):
    from transformers.video_utils import VideoMetadata

    for total, n in [(8, 3), (12, 4), (10, 10), (7, 1), (100, 8), (33, 7), (1000, 32), (5, 2), (97, 13), (3, 3)]:
        ref = hf.video_processor.sample_frames(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
        assert sample_frame_indices(total, n) == ref.tolist(), (total, n)
    with pytest.raises(VideoError, match="num_frames=9"):
        sample_frame_indices(8, 9)


# ------------------------------------------------------------------ images


def _rand(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed + h * 7919 + w)
    shape = (h, w) if c == 0 else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _smooth(h, w, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    r = (127 + 127 * np.sin(xx / 7.0 + seed)).astype(np.uint8)
    g = (127 + 127 * np.cos(yy / 5.0)).astype(np.uint8)
    b = ((xx + yy) % 256).astype(np.uint8)
    return np.stack([r, g, b], -1)


def _image_cases():
    cases = []
    add = lambda name, img, m: cases.append(pytest.param(img, m, id=name))  # noqa: E731
    add("1x1", PIL.Image.fromarray(_rand(1, 1)), 12)
    add("1x300", PIL.Image.fromarray(_rand(300, 1)), 12)
    add("300x1", PIL.Image.fromarray(_rand(1, 300)), 12)
    add("2x2000", PIL.Image.fromarray(_rand(2000, 2)), 6)
    add("3000x1000", PIL.Image.fromarray(_smooth(1000, 3000)), 12)
    add("448sq", PIL.Image.fromarray(_rand(448, 448)), 12)
    add("449x448", PIL.Image.fromarray(_rand(448, 449)), 12)
    add("896x448", PIL.Image.fromarray(_smooth(448, 896)), 12)
    add("50x40-max1", PIL.Image.fromarray(_rand(40, 50)), 1)
    add("640x480-max2", PIL.Image.fromarray(_smooth(480, 640)), 2)
    add("200x900-max3", PIL.Image.fromarray(_rand(900, 200)), 3)
    add("123x45-max4", PIL.Image.fromarray(_rand(45, 123)), 4)
    add("500x500-max5", PIL.Image.fromarray(_rand(500, 500)), 5)
    add("1000x100-max8", PIL.Image.fromarray(_rand(100, 1000)), 8)
    add("300x200-max24", PIL.Image.fromarray(_rand(200, 300)), 24)
    add("77x333-max16", PIL.Image.fromarray(_rand(333, 77)), 16)
    rgba = _rand(120, 160, 4)
    rgba[..., 3] = np.linspace(0, 255, 160, dtype=np.uint8)[None, :]
    add("RGBA-alpha-ramp", PIL.Image.fromarray(rgba, "RGBA"), 12)
    add("L", PIL.Image.fromarray(_rand(90, 70, 0), "L"), 12)
    la = np.stack([_rand(64, 100, 0), _rand(64, 100, 0, seed=3)], -1)
    add("LA", PIL.Image.fromarray(la, "LA"), 12)
    pal = PIL.Image.fromarray(_smooth(80, 120)).convert("P", palette=PIL.Image.ADAPTIVE, colors=32)
    add("P", pal, 12)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    add("P-transparency", pal_t, 12)
    add("CMYK", PIL.Image.fromarray(_rand(60, 60)).convert("CMYK"), 12)
    add("I;16", PIL.Image.fromarray((_rand(50, 70, 0).astype(np.uint16) * 200)), 12)
    add("numpy-RGB", _rand(100, 150), 12)
    add("numpy-RGBA", _rand(100, 150, 4), 12)
    add("numpy-1ch", _rand(100, 150, 1), 12)
    return cases


@pytest.mark.parametrize("image,max_tiles", _image_cases())
def test_image_parity(ours, hf, image, max_tiles):
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    enc = ours(conv, max_num_tiles=max_tiles)
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, images=[image], max_patches=max_tiles)
    _assert_same(enc, hf_ids, hf_pv)
    assert sum(enc.num_patches) == enc.pixel_values.shape[0]
    assert enc.input_ids.count(151667) == 256 * enc.pixel_values.shape[0]


def test_to_rgb_array_matches_hf():
    from transformers.image_transforms import convert_to_rgb

    rgba = _rand(30, 40, 4)
    for img in [rgba, _rand(30, 40, 1), PIL.Image.fromarray(rgba, "RGBA"), PIL.Image.fromarray(_rand(9, 9, 0), "L")]:
        assert np.array_equal(to_rgb_array(img), convert_to_rgb(img, return_numpy=True))


def test_multi_image_and_prompt(ours, hf):
    a, b = PIL.Image.fromarray(_smooth(300, 800)), PIL.Image.fromarray(_rand(64, 64))
    png = io.BytesIO()
    b.save(png, format="PNG")
    b_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()  # lossless: b's own pixels
    conv = [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": a},
                {"type": "text", "text": "Compare with"},
                {"type": "image_url", "image_url": {"url": b_uri}},
                {"type": "text", "text": "Describe this image in detail."},
            ],
        },
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Write a haiku."},
    ]
    enc = ours(conv)
    templ_conv = [
        {**m, "content": [{"type": "image"} if c["type"] == "image_url" else c for c in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in conv
    ]
    assert enc.prompt == hf.apply_chat_template(
        [
            {**m, "content": [{"type": c["type"], **({"text": c["text"]} if "text" in c else {})} for c in m["content"]]}
            if isinstance(m["content"], list)
            else m
            for m in templ_conv
        ],
        add_generation_prompt=True,
    )
    assert enc.prompt.count(IMAGE_TOKEN) == 2
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, images=[a, b])
    _assert_same(enc, hf_ids, hf_pv)
    assert enc.num_patches == [11, 1]  # 800x300 -> 5x2 grid + thumbnail
    # raw-text path gives the same result
    enc2 = ours(text=enc.prompt, images=[a, b])
    assert enc2.input_ids == enc.input_ids and torch.equal(enc2.pixel_values, enc.pixel_values)
    # no generation prompt
    enc3 = ours(conv, add_generation_prompt=False)
    assert enc3.prompt.endswith("Write a haiku.<|im_end|>\n")
    # text-only
    t = ours([{"role": "user", "content": "Hello, world!"}])
    assert t.pixel_values is None and t.num_patches == []
    assert t.input_ids == [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]


def test_image_sources(tmp_path, ours):
    arr = _smooth(50, 60)
    img = PIL.Image.fromarray(arr)
    p = tmp_path / "x.png"
    img.save(p)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ref = ours(text=IMAGE_TOKEN, images=[arr]).pixel_values
    for src in [img, arr, str(p), p, "file://" + str(p), data_uri]:
        assert np.array_equal(to_rgb_array(load_image(src)), arr)
        assert torch.equal(ours(text=IMAGE_TOKEN, images=[src]).pixel_values, ref)
    b64 = base64.b64encode(buf.getvalue()).decode()
    conv = [{"role": "user", "content": [{"type": "image", "base64": b64}, {"type": "image", "path": str(p)}]}]
    assert torch.equal(ours(conv).pixel_values, torch.cat([ref, ref]))
    # EXIF orientation applied, mode kept
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW
    rgba = PIL.Image.fromarray(_rand(20, 30, 4), "RGBA")
    q = tmp_path / "o.png"
    rgba.save(q, exif=exif)
    loaded = load_image(str(q))
    assert loaded.size == (20, 30) and loaded.mode == "RGBA"


# ------------------------------------------------------------------ video


def _frames(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_video_parity(ours, hf):
    frames = _frames(8, 97, 131)
    conv = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}]
    enc = ours(conv, num_frames=3)
    from transformers.video_utils import VideoMetadata

    idx = hf.video_processor.sample_frames(VideoMetadata(total_num_frames=8, fps=24.0), num_frames=3).tolist()
    assert idx == [1, 4, 6]
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, videos=[np.stack([frames[i] for i in idx])])
    _assert_same(enc, hf_ids, hf_pv)
    assert enc.num_patches == [1, 1, 1]
    # all frames when num_frames is not given; 4-D array source
    enc_all = ours(text="<video>\nDescribe.", videos=[np.stack(frames)])
    hf_ids, hf_pv = _hf_call(hf, "<video>\nDescribe.", videos=[np.stack(frames)])
    _assert_same(enc_all, hf_ids, hf_pv)


def test_mixed_order(ours, hf):
    a = PIL.Image.fromarray(_smooth(200, 500))
    b = PIL.Image.fromarray(_rand(40, 30))
    frames = _frames(5, 33, 47, seed=2)
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": a},
                {"type": "text", "text": "then"},
                {"type": "video", "video": frames},
                {"type": "text", "text": "and"},
                {"type": "image", "image": b},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    enc = ours(conv, max_num_tiles=6)
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, images=[a, b], videos=[np.stack(frames)], max_patches=6)
    _assert_same(enc, hf_ids, hf_pv)
    # 500x200 (max 6): 2x1 + thumbnail; 5 frames; 30x40: 2x3 + thumbnail
    assert enc.num_patches == [3, 1, 1, 1, 1, 1, 7]
    ia = ours(text=IMAGE_TOKEN, images=[a], max_num_tiles=6).pixel_values
    vf = ours(text="<video>", videos=[frames]).pixel_values
    ib = ours(text=IMAGE_TOKEN, images=[b], max_num_tiles=6).pixel_values
    assert torch.equal(enc.pixel_values, torch.cat([ia, vf, ib]))
    # one content digest per num_patches entry, in text order: the same pixels give the same digest
    d = enc.media_digests
    assert len(d) == len(enc.num_patches) == 7 and len(set(d)) == 7
    assert d[0] == ours(text=IMAGE_TOKEN, images=[a], max_num_tiles=6).media_digests[0]
    assert d[1:6] == ours(text="<video>", videos=[frames]).media_digests
    assert d[6] == ours(text=IMAGE_TOKEN, images=[b], max_num_tiles=6).media_digests[0]
    assert d[0] != ours(text=IMAGE_TOKEN, images=[a], max_num_tiles=1).media_digests[0]  # other tiles
    nudged = _smooth(200, 500).copy()
    nudged[0, 0, 0] ^= 1  # one pixel, one bit
    assert d[0] != ours(text=IMAGE_TOKEN, images=[PIL.Image.fromarray(nudged)], max_num_tiles=6).media_digests[0]


def test_video_file(tmp_path, ours, hf):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    frames = [_smooth(48, 64, seed=i) for i in range(12)]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    with av.open(str(path)) as c:
        decoded = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
    assert len(decoded) == 12
    from transformers.video_utils import VideoMetadata

    idx = hf.video_processor.sample_frames(VideoMetadata(total_num_frames=len(decoded), fps=12.0), num_frames=4).tolist()
    conv = [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": "Describe."}]}]
    enc = ours(conv, num_frames=4)
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, videos=[np.stack([decoded[i] for i in idx])])
    _assert_same(enc, hf_ids, hf_pv)
    enc2 = ours(text="<video>", videos=["file://" + str(path)], num_frames=4)
    assert torch.equal(enc2.pixel_values, enc.pixel_values)


# ------------------------------------------------------------------ templates and files


def test_template_loading(tmp_path, ckpt):
    assert load_chat_template(ckpt) == DEFAULT_CHAT_TEMPLATE
    assert load_chat_template(tmp_path) == DEFAULT_CHAT_TEMPLATE
    import json

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "P"}))
    assert load_chat_template(tmp_path) == "P"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert load_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | tojson }}{{ raise_exception('boom') if 0 }}")
    assert load_chat_template(tmp_path).startswith("{{ messages")
    t = ChatTemplate(load_chat_template(tmp_path))
    assert t.render([{"role": "user", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(PromptError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([])


def test_autoprocessor_offline(ckpt):
    from transformers import AutoProcessor

    p = AutoProcessor.from_pretrained(str(ckpt), local_files_only=True)
    assert type(p).__name__ == "InternVLProcessor"
    assert (p.image_token_id, p.start_image_token_id, p.end_image_token_id) == (151667, 151665, 151666)
    assert p.video_token == "<video>" and p.image_seq_length == 256
    assert p.tokenizer.model_max_length == 8192 and p.tokenizer.eos_token_id == 151645


# ------------------------------------------------------------------ errors


def test_errors(tmp_path, ours):
    with pytest.raises(ImageError, match="nope.png"):
        ours(text=IMAGE_TOKEN, images=[str(tmp_path / "nope.png")])
    with pytest.raises(ImageError, match="0x5"):
        load_image(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match=r"\(0, 4, 3\)"):
        ours(text=IMAGE_TOKEN, images=[np.zeros((0, 4, 3), np.uint8)])
    with pytest.raises(ImageError, match="float32"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="int"):
        load_image(12345)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="bad.jpg"):
        ours(text=IMAGE_TOKEN, images=[str(bad)])
    trunc = tmp_path / "trunc.png"
    buf = io.BytesIO()
    PIL.Image.fromarray(_rand(64, 64)).save(buf, format="PNG")
    trunc.write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(str(trunc))
    with pytest.raises(ImageError, match=r"http://127\.0\.0\.1:9/x\.png"):
        ours(text=IMAGE_TOKEN, images=["http://127.0.0.1:9/x.png"])
    garbage = "data:image/png;base64," + "QUJD" * 100
    with pytest.raises(ImageError, match="data:image/png;base64") as ei:
        load_image(garbage)
    assert len(str(ei.value)) < 300
    with pytest.raises(VideoError, match="no frames"):
        ours(text="<video>", videos=[[]])
    with pytest.raises(VideoError, match="missing.mp4"):
        ours(text="<video>", videos=[str(tmp_path / "missing.mp4")])
    with pytest.raises(VideoError, match="bad.jpg"):
        ours(text="<video>", videos=[str(bad)])
    img = PIL.Image.fromarray(_rand(20, 20))
    with pytest.raises(PromptError, match="2 image placeholders .* but 1 image"):
        ours(text=IMAGE_TOKEN * 2, images=[img])
    with pytest.raises(PromptError, match="1 image placeholder .* but 2 images"):
        ours(text=IMAGE_TOKEN, images=[img, img])
    with pytest.raises(PromptError, match="0 video placeholders .* but 1 video"):
        ours(text="hi", videos=[_frames(2, 8, 8)])
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "x <IMG_CONTEXT> y"}]}]
    with pytest.raises(PromptError, match="2 image placeholders .* but 1 image"):
        ours(conv)
    with pytest.raises(PromptError, match=r"messages\[1\]\.content\[0\] has unknown type 'audio'"):
        ours([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "audio", "url": "a.wav"}]}])
    with pytest.raises(PromptError, match="max_tiles=0"):
        ours(text=IMAGE_TOKEN, images=[img], max_num_tiles=0)
    with pytest.raises(VideoError, match="num_frames=5"):
        ours(text="<video>", videos=[_frames(3, 8, 8)], num_frames=5)
    from internvl_engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Processor.from_pretrained(tmp_path / "empty")
    assert issubclass(CheckpointError, InternVLEngineError)
    # still usable afterwards
    enc = ours(text=IMAGE_TOKEN + "ok", images=[img])
    assert enc.num_patches == [1] and enc.pixel_values.shape == (1, 3, 448, 448)


def test_video_placeholder_glued_to_text(ours, hf):
    """Text right before <video> is tokenised together with "Frame1: ", as in InternVLProcessor's expanded string."""
    frames = _frames(2, 16, 16)
    enc = ours(text="Watch this <video>then answer.", videos=[np.stack(frames)])
    hf_ids, _ = _hf_call(hf, "Watch this <video>then answer.", videos=[np.stack(frames)])
    assert enc.input_ids == hf_ids


# ------------------------------------------------------------------ image spans


def _check_spans(enc, seq=256):
    """image_spans: one [start, end) per num_patches entry, in order, each exactly its <IMG_CONTEXT> run between
    <img> and </img>, together covering every <IMG_CONTEXT> id."""
    ids = enc.input_ids
    assert len(enc.image_spans) == len(enc.num_patches)
    covered = []
    for (start, end), n in zip(enc.image_spans, enc.num_patches):
        assert end - start == n * seq
        assert set(ids[start:end]) == {151667}
        assert ids[start - 1] == 151665 and ids[end] == 151666  # <img> ... </img>
        covered += range(start, end)
    assert covered == [i for i, t in enumerate(ids) if t == 151667]  # in order, disjoint, nothing left out


def test_image_spans(ours):
    a, b = PIL.Image.fromarray(_smooth(300, 800)), PIL.Image.fromarray(_rand(64, 64))
    frames = _frames(3, 20, 30)
    conv = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and"},
                                         {"type": "image", "image": b}, {"type": "video", "video": frames},
                                         {"type": "text", "text": "?"}]}]
    enc = ours(conv, max_num_tiles=6)
    assert enc.num_patches == [4, 1, 1, 1, 1]  # 800x300: 3x1 + thumbnail
    _check_spans(enc)
    first = enc.input_ids.index(151667)
    assert enc.image_spans[0] == (first, first + 4 * 256)

    one = ours(text=IMAGE_TOKEN + "Describe this image in detail.", images=[b])
    assert one.image_spans == [(1, 257)] and one.input_ids[257:] == [151666, 74785, 419, 2168, 304, 7716, 13]

    # raw prompts: adjacent placeholders, a video glued to text, the same spans as the rendered conversation
    raw = ours(text=IMAGE_TOKEN * 2 + "<video>x" + IMAGE_TOKEN, images=[a, b, a], videos=[np.stack(frames)],
               max_num_tiles=3)
    _check_spans(raw)
    assert raw.num_patches == [4, 1, 1, 1, 1, 4]
    same = ours(text=enc.prompt, images=[a, b], videos=[frames], max_num_tiles=6)
    assert same.image_spans == enc.image_spans and same.input_ids == enc.input_ids

    assert ours(text="no media").image_spans == []
    small = Processor.from_parts(ours.tokenizer, image_seq_length=4, tile_size=28)
    _check_spans(small(text="a" + IMAGE_TOKEN + "b<video>", images=[a], videos=[frames]), seq=4)
