"""Bad input -> a clear typed error (a subclass of InternVLEngineError) naming the culprit, and the same LLM object
answers a good request exactly as before right after each one. CPU only, tiny random checkpoint."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import (LLM, CheckpointError, ImageError, InternVLEngineError, PromptError, SamplingParams,
                             SamplingParamsError, UnsupportedModelError, VideoError)
from internvl_engine.loader import write_checkpoint

WEIGHTS = "model.safetensors"


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # square: one tile, keeps the file fast


IMG = _image()


def good_conversation():
    return [{"role": "user", "content": [{"type": "image", "image": IMG},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def good_params():
    return SamplingParams(max_tokens=8)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The requests here are tiny: one intra-op thread is ~10x faster than a contended pool on a 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def baseline(llm):
    out = llm.generate(good_conversation(), good_params())[0]
    assert len(out.token_ids) == 8 and out.text
    again = llm.generate(good_conversation(), good_params())[0]
    assert again.token_ids == out.token_ids and again.text == out.text  # greedy is deterministic
    return out


@pytest.fixture(scope="module")
def tensors(ckpt):
    return load_file(str(ckpt / WEIGHTS))


@pytest.fixture
def serves(llm, baseline):
    """Call after a bad input: the shared engine still answers the good request bit-identically."""
    def check():
        out = llm.generate(good_conversation(), good_params())[0]
        assert out.token_ids == baseline.token_ids
        assert out.text == baseline.text
        assert out.finish_reason == baseline.finish_reason
    return check


def expect(cls, match, fn, *args, **kwargs):
    with pytest.raises(cls, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, InternVLEngineError)
    return info.value


def variant(ckpt, dst, *, weights: dict | None = None, skip=()):
    """Copy of the checkpoint in dst: every file but the weights symlinked, `weights` (if given) written as
    model.safetensors; files named in skip are left out."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name == WEIGHTS or f.name in skip:
            continue
        os.symlink(f, dst / f.name)
    if weights is not None:
        save_file(weights, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def load(path):
    return LLM(path, dtype="float32", device="cpu")


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint_directory(tmp_path, serves):
    expect(CheckpointError, re.escape(str(tmp_path / "nope")), load, tmp_path / "nope")
    serves()


def test_no_safetensors(ckpt, tmp_path, serves):
    d = variant(ckpt, tmp_path / "empty")
    expect(CheckpointError, "no safetensors", load, d)
    serves()


def test_truncated_safetensors(ckpt, tmp_path, serves):
    d = variant(ckpt, tmp_path / "trunc")
    data = (ckpt / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    expect(CheckpointError, rf"{WEIGHTS}.*truncated or corrupt", load, d)
    serves()


def test_corrupt_safetensors(ckpt, tmp_path, serves):
    d = variant(ckpt, tmp_path / "corrupt")
    (d / WEIGHTS).write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect(CheckpointError, rf"{WEIGHTS}.*truncated or corrupt", load, d)
    serves()


def test_missing_tensor(ckpt, tmp_path, tensors, serves):
    key = "language_model.model.norm.weight"
    d = variant(ckpt, tmp_path / "missing", weights={k: v for k, v in tensors.items() if k != key})
    expect(CheckpointError, r"missing tensors for language_model\.norm\.weight", load, d)
    serves()


def test_missing_shard_of_packed_tensor(ckpt, tmp_path, tensors, serves):
    # k_proj is packed into qkv_proj: the message names the packed parameter and the missing piece
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    d = variant(ckpt, tmp_path / "missing_k", weights={k: v for k, v in tensors.items() if k != key})
    expect(CheckpointError, r"language_model\.layers\.1\.self_attn\.qkv_proj\.weight.*k_proj", load, d)
    serves()


def test_unexpected_tensor(ckpt, tmp_path, tensors, serves):
    d = variant(ckpt, tmp_path / "extra", weights={**tensors, "language_model.model.extra_head.weight": torch.ones(3)})
    expect(CheckpointError, r"unexpected tensor 'language_model\.model\.extra_head\.weight'", load, d)
    serves()


def test_duplicate_tensor_across_files(ckpt, tmp_path, tensors, serves):
    key = "language_model.model.norm.weight"
    d = variant(ckpt, tmp_path / "dup")
    os.symlink(ckpt / WEIGHTS, d / WEIGHTS)
    save_file({key: tensors[key]}, str(d / "extra.safetensors"))
    expect(CheckpointError, re.escape(repr(key)), load, d)
    serves()


@pytest.mark.parametrize("key,shape", [
    ("language_model.model.norm.weight", (65,)),
    ("language_model.model.layers.0.self_attn.q_proj.weight", (64, 32)),   # a shard of a packed matmul
    ("vision_tower.embeddings.patch_embeddings.projection.weight", (64, 3, 7, 7)),
])
def test_misshaped_tensor(ckpt, tmp_path, tensors, serves, key, shape):
    expected = tuple(tensors[key].shape)
    d = variant(ckpt, tmp_path / "shape", weights={**tensors, key: torch.zeros(shape)})
    err = expect(CheckpointError, re.escape(repr(key)), load, d)
    assert str(shape) in str(err) and str(expected) in str(err)
    serves()


def test_index_lists_missing_shard(ckpt, tmp_path, tensors, serves):
    d = variant(ckpt, tmp_path / "sharded")
    os.symlink(ckpt / WEIGHTS, d / "model-00001-of-00002.safetensors")
    keys = sorted(tensors)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[:-5]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in keys[-5:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expect(CheckpointError, r"model-00002-of-00002\.safetensors.*missing", load, d)
    serves()


def test_invalid_index(ckpt, tmp_path, serves):
    d = variant(ckpt, tmp_path / "badindex")
    os.symlink(ckpt / WEIGHTS, d / WEIGHTS)
    (d / "model.safetensors.index.json").write_text("{ not json")
    expect(CheckpointError, r"model\.safetensors\.index\.json", load, d)
    serves()


def _with_config(ckpt, dst, edit):
    d = variant(ckpt, dst, skip=("config.json",))
    os.symlink(ckpt / WEIGHTS, d / WEIGHTS)
    raw = json.loads((ckpt / "config.json").read_text())
    text = edit(raw)
    (d / "config.json").write_text(text if isinstance(text, str) else json.dumps(raw))
    return d


def test_unsupported_model_type(ckpt, tmp_path, serves):
    def edit(raw):
        raw["model_type"] = "llava"
        raw["architectures"] = ["LlavaForConditionalGeneration"]
    d = _with_config(ckpt, tmp_path / "llava", edit)
    expect(UnsupportedModelError, r"config\.json.*'llava'", load, d)
    serves()


@pytest.mark.parametrize("model_type,arch", [("qwen2_moe", "Qwen2MoeForCausalLM"), ("gpt_oss", "GptOssForCausalLM"),
                                             ("internlm2", "InternLM2ForCausalLM")])
def test_unsupported_language_model(ckpt, tmp_path, serves, model_type, arch):
    """A decoder family this engine does not implement names the field and lists the ones it does."""
    def edit(raw):
        raw["text_config"]["model_type"] = model_type
        raw["text_config"]["architectures"] = [arch]
    d = _with_config(ckpt, tmp_path / model_type, edit)
    expect(UnsupportedModelError, rf"config\.json: text_config\.model_type '{model_type}' .*implemented are "
           r"qwen2 \(Qwen2ForCausalLM\), llama \(LlamaForCausalLM/InternLM3ForCausalLM/InternLM2ForCausalLM\), "
           r"qwen3 \(Qwen3ForCausalLM\)", load, d)
    serves()


def test_missing_config(ckpt, tmp_path, serves):
    d = variant(ckpt, tmp_path / "noconfig", skip=("config.json",))
    os.symlink(ckpt / WEIGHTS, d / WEIGHTS)
    expect(CheckpointError, r"config\.json.*not found", load, d)
    serves()


def test_invalid_json_config(ckpt, tmp_path, serves):
    d = _with_config(ckpt, tmp_path / "badjson", lambda raw: '{"model_type": "internvl", ')
    expect(CheckpointError, r"config\.json.*not valid JSON", load, d)
    serves()


def test_config_not_an_object(ckpt, tmp_path, serves):
    d = _with_config(ckpt, tmp_path / "list", lambda raw: "[1, 2, 3]")
    expect(CheckpointError, r"config\.json.*JSON object", load, d)
    serves()


# ---------------------------------------------------------------------------------------------------- images
def _with_image(source):
    return [{"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "hi"}]}]


def test_image_path_not_found(llm, tmp_path, serves):
    path = str(tmp_path / "no_such_image.png")
    expect(ImageError, re.escape(path), llm.generate, _with_image(path), good_params())
    serves()


def test_image_garbage_bytes(llm, tmp_path, serves):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    expect(ImageError, r"cannot decode image .*garbage\.png", llm.generate, _with_image(str(path)), good_params())
    serves()


def test_image_zero_sized_array(llm, serves):
    expect(ImageError, r"empty.*\(0, 10, 3\)", llm.generate, _with_image(np.zeros((0, 10, 3), np.uint8)),
           good_params())
    serves()


def test_image_zero_sized_pil(llm, serves):
    img = PIL.Image.new("RGB", (0, 5))
    expect(ImageError, r"empty.*0x5", llm.generate, _with_image(img), good_params())
    serves()


def test_image_wrong_dtype_array(llm, serves):
    expect(ImageError, r"uint8.*float32", llm.generate, _with_image(np.zeros((8, 8, 3), np.float32)),
           good_params())
    serves()


def test_image_unsupported_object(llm, serves):
    expect(ImageError, r"unsupported image source .*int", llm.generate, _with_image(12345), good_params())
    serves()


def test_image_unreachable_url(llm, serves):
    url = "http://127.0.0.1:9/cat.png"
    expect(ImageError, re.escape(url), llm.generate, _with_image(url), good_params())
    serves()


@pytest.mark.parametrize("uri", ["data:image/png;base64,@@@not-base64@@@", "data:image/png,rawbytes",
                                 "data:image/png;base64," + "QUJD" * 8])
def test_image_malformed_data_uri(llm, serves, uri):
    expect(ImageError, r"data", llm.generate, _with_image(uri), good_params())
    serves()


# ---------------------------------------------------------------------------------------------------- videos
def test_video_without_frames(llm, serves):
    conv = [{"role": "user", "content": [{"type": "video", "video": []}, {"type": "text", "text": "hi"}]}]
    expect(VideoError, r"no frames", llm.generate, conv, good_params())
    serves()


def test_video_path_not_found(llm, tmp_path, serves):
    path = str(tmp_path / "no_such_video.mp4")
    conv = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "hi"}]}]
    expect(VideoError, re.escape(path), llm.generate, conv, good_params())
    serves()


def test_video_frame_shapes_differ(llm, serves):
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]
    conv = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "hi"}]}]
    expect(VideoError, r"frame 1", llm.generate, conv, good_params())
    serves()


def test_video_more_frames_requested_than_available(llm, serves):
    frames = [np.zeros((8, 8, 3), np.uint8)] * 2
    conv = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "hi"}]}]
    expect(VideoError, r"num_frames=3.*2 frames", llm.generate, conv, SamplingParams(max_tokens=8, num_frames=3))
    serves()


# ---------------------------------------------------------------------------------------------------- prompts
def test_more_placeholders_than_images(llm, serves):
    req = {"prompt": "<IMG_CONTEXT>\n<IMG_CONTEXT>\nhi", "images": [IMG]}
    expect(PromptError, r"2 image placeholders .* but 1 image\b", llm.generate, req, good_params())
    serves()


def test_more_images_than_placeholders(llm, serves):
    req = {"prompt": "hi", "images": [IMG]}
    expect(PromptError, r"0 image placeholders .* but 1 image\b", llm.generate, req, good_params())
    serves()


def test_video_placeholder_without_video(llm, serves):
    expect(PromptError, r"1 video placeholder .* but 0 videos", llm.generate, {"prompt": "<video>\nhi"},
           good_params())
    serves()


def test_literal_placeholder_in_text(llm, serves):
    conv = [{"role": "user", "content": [{"type": "image", "image": IMG},
                                         {"type": "text", "text": "look at <IMG_CONTEXT> this"}]}]
    expect(PromptError, r"2 image placeholders .* but 1 image\b", llm.generate, conv, good_params())
    serves()


def test_raw_request_without_prompt(llm, serves):
    expect(PromptError, r"'prompt'", llm.generate, {"images": [IMG]}, good_params())
    serves()


def test_unknown_content_type(llm, serves):
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "text", "text": "hi"}]}]
    expect(PromptError, r"unknown type 'audio'", llm.generate, conv, good_params())
    serves()


@pytest.mark.parametrize("bad,match", [
    ([], r"non-empty"),
    (None, r"conversation"),
    (42, r"conversation"),
    ([[{"content": "hi"}]], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": 7}], r"content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"'text' must be a string"),
])
def test_malformed_conversation(llm, serves, bad, match):
    expect(PromptError, match, llm.generate, bad, good_params())
    serves()


def test_prompt_longer_than_context(llm, serves):
    assert llm.max_model_len == 65536  # tiny preset: 32768 positions x dynamic RoPE factor 2
    text = "hello " * 70_000
    err = expect(PromptError, r"max_model_len", llm.generate, text, good_params())
    n = int(re.search(r"prompt has (\d+) tokens", str(err)).group(1))
    assert n > 65536 and "65536" in str(err)
    serves()


def test_max_model_len_argument(ckpt, serves):
    small = LLM(ckpt, dtype="float32", device="cpu", max_model_len=40)
    assert small.max_model_len == 40
    expect(PromptError, r"max_model_len", small.generate, "hello " * 50, good_params())
    out = small.generate("hello " * 10, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) <= 40
    del small
    serves()


@pytest.mark.parametrize("value", [0, -3, 2.5, "64"])
def test_invalid_max_model_len(ckpt, value):
    expect(InternVLEngineError, r"max_model_len", LLM, ckpt, dtype="float32", device="cpu", max_model_len=value)


def test_invalid_dtype(ckpt, serves):
    expect(InternVLEngineError, r"'int3'", LLM, ckpt, dtype="int3", device="cpu")
    serves()


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), r"temperature.*-1"),
    (dict(temperature=float("nan")), r"temperature"),
    (dict(top_p=0), r"top_p.*0"),
    (dict(top_p=1.5), r"top_p.*1\.5"),
    (dict(top_k=-5), r"top_k.*-5"),
    (dict(max_tokens=0), r"max_tokens.*0"),
    (dict(max_tokens=2.0), r"max_tokens"),
    (dict(seed=-1), r"seed.*-1"),
    (dict(max_num_tiles=0), r"max_num_tiles.*0"),
    (dict(max_num_tiles=65), r"max_num_tiles.*65"),
    (dict(num_frames=0), r"num_frames.*0"),
    (dict(stop_token_ids=[-1]), r"stop_token_ids"),
    (dict(stop_token_ids=None), r"stop_token_ids"),
    (dict(stop_token_ids=5), r"stop_token_ids"),
])
def test_invalid_sampling_params(kwargs, match, serves):
    expect(SamplingParamsError, match, SamplingParams, **kwargs)
    serves()


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("max_tokens", 0),
                                         ("max_num_tiles", 100), ("seed", -7)])
def test_mutated_sampling_params(llm, serves, field, value):
    params = good_params()
    setattr(params, field, value)
    expect(SamplingParamsError, field, llm.generate, good_conversation(), params)
    serves()


def test_wrong_params_type_and_count(llm, serves):
    expect(PromptError, r"SamplingParams.*dict", llm.generate, good_conversation(), {"max_tokens": 8})
    expect(PromptError, r"2 SamplingParams for 1 conversations", llm.generate, [good_conversation()],
           [good_params(), good_params()])
    serves()


# ---------------------------------------------------------------------------------------------------- batch, stream
def test_batch_with_one_bad_conversation(llm, baseline, serves):
    bad = _with_image(np.zeros((0, 4, 3), np.uint8))
    expect(ImageError, r"request 1: image 0: .*\(0, 4, 3\).*empty", llm.generate,
           [good_conversation(), bad, good_conversation()], good_params())
    outs = llm.generate([good_conversation(), good_conversation()], good_params())
    assert [o.token_ids for o in outs] == [baseline.token_ids] * 2
    serves()


def test_stream_raises_at_call_time(llm, baseline, serves):
    expect(PromptError, r"unknown type 'audio'", llm.stream,
           [{"role": "user", "content": [{"type": "audio"}]}], good_params())
    expect(ImageError, r"empty", llm.stream, _with_image(np.zeros((0, 10, 3), np.uint8)), good_params())
    bad = good_params()
    bad.top_p = 2.0
    expect(SamplingParamsError, r"top_p", llm.stream, good_conversation(), bad)
    stream = llm.stream(good_conversation(), good_params())
    deltas = list(stream)
    assert "".join(deltas) == baseline.text
    assert stream.output is not None and stream.output.token_ids == baseline.token_ids
    serves()


def test_abandoned_stream_does_not_break_engine(llm, serves):
    stream = llm.stream(good_conversation(), good_params())
    next(stream)
    del stream
    serves()
