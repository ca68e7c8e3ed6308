"""Where checkpoints keep processor settings, and processor/model agreement. CPU only.

transformers 5 saves the image and video processor settings nested in processor_config.json (and no
preprocessor_config.json); transformers 4 and the -hf hub files use separate files; OpenGVLab's original checkpoints
have a CLIP-style preprocessor_config.json and keep their tiling in config.json."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest

from hf_processor import make_hf_processor, save_hf_processor
from test_processor import _assert_same, _check_spans, _frames, _hf_call, _rand, _smooth

from internvl_engine.config import ModelConfig
from internvl_engine.errors import CheckpointError, UnsupportedModelError
from internvl_engine.processor import Processor
from internvl_engine.processor.files import read_processor_settings, write_processor_files
from internvl_engine.config import preset_config

IMAGE = "<IMG_CONTEXT>"

# Non-default everything: tile side, tiling limits, image and video statistics.
SAVED = {
    "224-max6": dict(tile_size=224, image_seq_length=64, min_patches=1, max_patches=6,
                     image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.25),
                     video_mean=(0.45, 0.45, 0.45), video_std=(0.27, 0.26, 0.28)),
    "336-min2-max9": dict(tile_size=336, image_seq_length=144, min_patches=2, max_patches=9,
                          image_mean=(0.481, 0.458, 0.408), image_std=(0.269, 0.261, 0.276)),
}


@pytest.fixture(scope="module", params=list(SAVED))
def saved(request, tmp_path_factory):
    """(dir written by transformers' own save_pretrained, the settings, transformers' processor read back)."""
    d = tmp_path_factory.mktemp(request.param)
    save_hf_processor(d, **SAVED[request.param])
    return d, SAVED[request.param], make_hf_processor(d)


def _model_config(d, image_size=448, **top) -> ModelConfig:
    raw = preset_config("tiny")
    raw["vision_config"]["image_size"] = [image_size, image_size]
    raw.update(top)
    (d / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_pretrained(d)


# ------------------------------------------------------------------ transformers 5's nested form


def test_transformers5_writes_nested_settings(saved):
    d, s, _ = saved
    assert not (d / "preprocessor_config.json").exists() and not (d / "video_preprocessor_config.json").exists()
    nested = json.loads((d / "processor_config.json").read_text())
    assert nested["image_processor"]["size"] == {"height": s["tile_size"], "width": s["tile_size"]}
    assert nested["image_processor"]["max_patches"] == s["max_patches"]
    assert nested["video_processor"]["size"]["height"] == s["tile_size"]

    ours = Processor.from_pretrained(d)
    assert (ours.tile_size, ours.video_size, ours.image_seq_length) == (s["tile_size"],) * 2 + (s["image_seq_length"],)
    assert (ours.min_tiles, ours.max_tiles) == (s["min_patches"], s["max_patches"])
    assert ours.image_mean == pytest.approx(s["image_mean"]) and ours.image_std == pytest.approx(s["image_std"])
    assert ours.video_mean == pytest.approx(s.get("video_mean", s["image_mean"]))
    assert ours.video_std == pytest.approx(s.get("video_std", s["image_std"]))
    where = read_processor_settings(d).where
    assert where["tile_size"].endswith("processor_config.json (image_processor)")
    assert where["video_size"].endswith("processor_config.json (video_processor)")


@pytest.mark.parametrize("w,h", [(800, 300), (64, 64), (1, 300), (500, 500), (200, 900)])
def test_transformers5_image_parity(saved, w, h):
    """The checkpoint's own tiling limits apply when the caller gives none, on both sides."""
    d, s, hf = saved
    ours = Processor.from_pretrained(d)
    image = PIL.Image.fromarray(_smooth(h, w) if w > 100 else _rand(h, w))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    enc = ours(conv)
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, images=[image])
    _assert_same(enc, hf_ids, hf_pv)
    assert enc.pixel_values.shape[-1] == s["tile_size"]
    _check_spans(enc, s["image_seq_length"])
    enc = ours(conv, max_num_tiles=3)  # and a caller's limit, passed the same way to both
    hf_ids, hf_pv = _hf_call(hf, enc.prompt, images=[image], max_patches=3, min_patches=min(3, s["min_patches"]))
    _assert_same(enc, hf_ids, hf_pv)


def test_transformers5_mixed_parity(saved):
    d, s, hf = saved
    ours = Processor.from_pretrained(d)
    a, b = PIL.Image.fromarray(_smooth(200, 500)), PIL.Image.fromarray(_rand(40, 30))
    frames = _frames(4, 33, 47, seed=3)
    prompt = f"{IMAGE}then<video>and{IMAGE}?"
    enc = ours(text=prompt, images=[a, b], videos=[np.stack(frames)])
    hf_ids, hf_pv = _hf_call(hf, prompt, images=[a, b], videos=[np.stack(frames)])
    _assert_same(enc, hf_ids, hf_pv)
    _check_spans(enc, s["image_seq_length"])


# ------------------------------------------------------------------ transformers 4 and original forms


def test_transformers4_files_with_other_tiles(tmp_path):
    write_processor_files(tmp_path, tile_size=224, image_seq_length=64)
    ours, hf = Processor.from_pretrained(tmp_path), make_hf_processor(tmp_path)
    assert (ours.tile_size, ours.video_size, ours.image_seq_length) == (224, 224, 64)
    image = PIL.Image.fromarray(_smooth(300, 700))
    enc = ours(text=IMAGE + "x", images=[image], max_num_tiles=5)
    _assert_same(enc, *_hf_call(hf, IMAGE + "x", images=[image], max_patches=5))


def _original_preprocessor(d, size, crop):
    """The CLIP-style preprocessor_config.json OpenGVLab's checkpoints carry."""
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": crop, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": size}))


def _tokenizer_only(d):
    write_processor_files(d)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        (d / name).unlink()


def test_original_checkpoint_settings(tmp_path):
    _tokenizer_only(tmp_path)
    _original_preprocessor(tmp_path, 448, 448)
    p = Processor.from_pretrained(tmp_path)
    assert (p.tile_size, p.video_size, p.image_seq_length, p.min_tiles, p.max_tiles) == (448, 448, 256, 1, 12)
    _original_preprocessor(tmp_path, {"shortest_edge": 224}, {"height": 224, "width": 224})
    assert Processor.from_pretrained(tmp_path).tile_size == 224
    _original_preprocessor(tmp_path, 448, 336)
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json.*crop_size"):
        Processor.from_pretrained(tmp_path)

    # the original config.json keeps the tiling limits (max_dynamic_patch) and the tile side (force_image_size)
    _original_preprocessor(tmp_path, 448, 448)
    raw = {"model_type": "internvl_chat", "force_image_size": 448, "downsample_ratio": 0.5, "ps_version": "v2",
           "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
           "vision_config": {"image_size": 448, "patch_size": 14, "hidden_act": "gelu"},
           "llm_config": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}}
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.min_tiles, cfg.max_tiles) == (1, 6)
    p = Processor.from_pretrained(tmp_path, model_config=cfg)
    assert (p.min_tiles, p.max_tiles, p.image_seq_length) == (1, 6, 256)
    assert ModelConfig.from_dict({**raw, "dynamic_image_size": False}).max_tiles == 1
    with pytest.raises(UnsupportedModelError, match="use_thumbnail"):
        ModelConfig.from_dict({**raw, "use_thumbnail": False})
    with pytest.raises(UnsupportedModelError, match="force_image_size 224 differs from the vision image_size 448"):
        ModelConfig.from_dict({**raw, "force_image_size": 224})


def test_unstated_settings_follow_the_model(tmp_path):
    _tokenizer_only(tmp_path)
    cfg = _model_config(tmp_path, image_size=224)
    assert cfg.image_seq_length == 64 and cfg.source.endswith("config.json")
    p = Processor.from_pretrained(tmp_path, model_config=cfg)
    assert (p.tile_size, p.video_size, p.image_seq_length) == (224, 224, 64)
    enc = p(text=IMAGE, images=[PIL.Image.fromarray(_rand(50, 50))])
    assert enc.pixel_values.shape == (1, 3, 224, 224) and enc.image_spans == [(1, 65)]
    p = Processor.from_parts(None, model_config=cfg)
    assert (p.tile_size, p.image_seq_length) == (224, 64)
    # without a model config: the InternVL3 defaults, as before
    p = Processor.from_pretrained(tmp_path)
    assert (p.tile_size, p.image_seq_length, p.max_tiles) == (448, 256, 12)


# ------------------------------------------------------------------ processor and model must agree


def test_mismatched_tile_size(saved, tmp_path):
    d, s, _ = saved
    cfg = _model_config(tmp_path, image_size=448)
    with pytest.raises(CheckpointError, match=rf"tile size {s['tile_size']} \(.*processor_config\.json "
                                              rf"\(image_processor\)\).*image_size 448 \(.*config\.json\)"):
        Processor.from_pretrained(d, model_config=cfg)
    Processor.from_pretrained(d)  # alone it still loads
    agreeing = _model_config(tmp_path, image_size=s["tile_size"])
    assert Processor.from_pretrained(d, model_config=agreeing).image_seq_length == s["image_seq_length"]


def test_mismatched_image_seq_length(tmp_path):
    write_processor_files(tmp_path, image_seq_length=64)
    cfg = _model_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"image_seq_length 64 \(.*processor_config\.json\).*256 tokens per "
                                              r"tile \(.*config\.json"):
        Processor.from_pretrained(tmp_path, model_config=cfg)
    with pytest.raises(CheckpointError, match=r"image_seq_length 64 \(given to the Processor\)"):
        Processor.from_parts(None, image_seq_length=64, model_config=cfg)


def test_mismatched_video_size_and_token_id(tmp_path):
    write_processor_files(tmp_path)
    cfg = _model_config(tmp_path)
    Processor.from_pretrained(tmp_path, model_config=cfg)
    v = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    v["size"] = {"height": 224, "width": 224}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(v))
    with pytest.raises(CheckpointError, match=r"video frame size 224 \(.*video_preprocessor_config\.json\).*448"):
        Processor.from_pretrained(tmp_path, model_config=cfg)
    write_processor_files(tmp_path)
    cfg = _model_config(tmp_path, image_token_id=151666)
    with pytest.raises(CheckpointError, match=r"<IMG_CONTEXT> is id 151667 .*tokenizer\.json.*151666 \(.*config\.json"):
        Processor.from_pretrained(tmp_path, model_config=cfg)


def test_bad_processor_files(tmp_path):
    write_processor_files(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"processor_config\.json: image_processor must be a JSON object"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {"height": 448}}}))
    with pytest.raises(CheckpointError, match=r"image_processor\): size must be one square tile side"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": "many"}))
    with pytest.raises(CheckpointError, match="image_seq_length must be a positive integer"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"processor_config\.json: not valid JSON"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"resample": 2}}))
    with pytest.raises(CheckpointError, match=r"video_processor\): resample=2"):
        Processor.from_pretrained(tmp_path)
