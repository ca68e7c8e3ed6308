"""A checkpoint's processor files (spec sections 6-7): reading the settings from every place transformers 4 and 5
and OpenGVLab keep them, and writing an InternVL3 -hf file set."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_json
from ..constants import IMAGE_SEQ_LENGTH, TILE_SIZE
from ..errors import CheckpointError
from .images import IMAGENET_MEAN, IMAGENET_STD
from .template import DEFAULT_CHAT_TEMPLATE
from .tokenizer import (
    CONTEXT_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    START_IMAGE_TOKEN,
    VIDEO_TOKEN,
    build_internvl3_tokenizer_json,
)


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config(tok: dict, model_max_length: int, chat_template: str | None = None) -> dict:
    """tokenizer_config.json for an InternVL tokenizer.json `tok` (Qwen2 byte-level BPE, no BOS)."""
    named = {
        "start_image_token": START_IMAGE_TOKEN,
        "end_image_token": END_IMAGE_TOKEN,
        "context_image_token": CONTEXT_IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }
    added_decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tok["added_tokens"]
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        # transformers 5.x turns a dict of named extra special tokens into tokenizer attributes
        # (tokenizer.start_image_token / start_image_token_id ...), which InternVLProcessor reads.
        "extra_special_tokens": named,
        **named,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "processor_class": "InternVLProcessor",
        "tokenizer_class": "Qwen2Tokenizer",
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }


def write_tokenizer_files(dst_dir, tok: dict, chat_template: str, model_max_length: int) -> list[Path]:
    """What transformers' AutoTokenizer.from_pretrained(dst_dir) loads, and so the clients built on it (guidellm,
    vLLM's `bench serve`), which take a tokenizer by name or path: tokenizer.json, tokenizer_config.json with the
    chat template and the special tokens, special_tokens_map.json. The paths written."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": tok, "tokenizer_config.json": tokenizer_config(tok, model_max_length, chat_template),
             "special_tokens_map.json": {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}}
    for name, data in files.items():
        _dump(dst / name, data)
    return [dst / name for name in files]


def write_processor_files(dst_dir, tile_size: int = TILE_SIZE, image_seq_length: int = IMAGE_SEQ_LENGTH,
                          model_max_length: int = 8192, tokenizer_json: dict | None = None) -> None:
    """The transformers 4 layout: image and video settings in preprocessor_config.json and
    video_preprocessor_config.json, image_seq_length alone in processor_config.json. The tokenizer is InternVL3's
    unless `tokenizer_json` is given (tokenizer.builtin_tokenizer_json: a random preset's own)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_internvl3_tokenizer_json() if tokenizer_json is None else tokenizer_json
    _dump(dst / "tokenizer.json", tok)

    _dump(dst / "tokenizer_config.json", tokenizer_config(tok, model_max_length))
    (dst / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    # Both processors resize bicubically to one tile and normalise with ImageNet statistics.
    common = {"processor_class": "InternVLProcessor", "size": {"height": tile_size, "width": tile_size},
              "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True}
    _dump(dst / "preprocessor_config.json", {"image_processor_type": "GotOcr2ImageProcessorFast", **common,
                                             "crop_to_patches": False, "min_patches": 1, "max_patches": 12})
    _dump(dst / "processor_config.json", {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"})
    _dump(dst / "video_preprocessor_config.json", {"video_processor_type": "InternVLVideoProcessor", **common,
                                                   "do_sample_frames": False, "initial_shift": True})


# ---------------------------------------------------------------------------------------------------------- reading
PROCESSOR_CONFIG = "processor_config.json"
IMAGE_CONFIG = "preprocessor_config.json"
VIDEO_CONFIG = "video_preprocessor_config.json"


@dataclass
class ProcessorFileSettings:
    """What a checkpoint's processor files state; None where no file says. `where` names the file (and nested
    section) each stated setting came from, for error messages."""

    tile_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    min_tiles: int | None = None
    max_tiles: int | None = None
    image_seq_length: int | None = None
    video_size: int | None = None
    video_mean: tuple[float, ...] | None = None
    video_std: tuple[float, ...] | None = None
    model_max_length: int | None = None
    where: dict[str, str] = field(default_factory=dict)


def read_processor_settings(checkpoint_dir) -> ProcessorFileSettings:
    """Settings from the transformers 5 form (image_processor / video_processor nested in processor_config.json)
    or the transformers 4 and OpenGVLab form (preprocessor_config.json, video_preprocessor_config.json), looked up
    in transformers' order: the nested section first, then the separate files; the video processor falls back to
    preprocessor_config.json as transformers' does."""
    d = Path(checkpoint_dir)
    out = ProcessorFileSettings()
    proc_path = d / PROCESSOR_CONFIG
    proc = read_json(proc_path) if proc_path.is_file() else {}

    image = _section(d, proc, "image_processor", (IMAGE_CONFIG,))
    if image is not None:
        cfg, where = image
        _check_resample(cfg, where)
        _take(out, "tile_size", _tile_side(cfg, where), where)
        _take(out, "image_mean", _floats(cfg, "image_mean", where), where)
        _take(out, "image_std", _floats(cfg, "image_std", where), where)
        # crop_to_patches in the file does not matter: InternVLProcessor always passes crop_to_patches=True
        _take(out, "min_tiles", _int(cfg, "min_patches", where), where)
        _take(out, "max_tiles", _int(cfg, "max_patches", where), where)

    video = _section(d, proc, "video_processor", (VIDEO_CONFIG, IMAGE_CONFIG))
    if video is not None:
        cfg, where = video
        _check_resample(cfg, where)
        _take(out, "video_size", _tile_side(cfg, where), where)
        _take(out, "video_mean", _floats(cfg, "image_mean", where), where)
        _take(out, "video_std", _floats(cfg, "image_std", where), where)

    _take(out, "image_seq_length", _int(proc, "image_seq_length", str(proc_path)), str(proc_path))
    tok_cfg = d / "tokenizer_config.json"
    if tok_cfg.is_file():
        out.model_max_length = read_json(tok_cfg).get("model_max_length")
    return out


def _section(d: Path, proc: dict, key: str, files: tuple[str, ...]) -> tuple[dict, str] | None:
    if key in proc:
        cfg = proc[key]
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{d / PROCESSOR_CONFIG}: {key} must be a JSON object, got {type(cfg).__name__}")
        return cfg, f"{d / PROCESSOR_CONFIG} ({key})"
    for name in files:
        if (d / name).is_file():
            return read_json(d / name), str(d / name)
    return None


def _take(out: ProcessorFileSettings, name: str, value, where: str) -> None:
    if value is not None:
        setattr(out, name, value)
        out.where[name] = where


def _check_resample(cfg: dict, where: str) -> None:
    resample = cfg.get("resample", 3)
    if resample not in (3, "bicubic", "BICUBIC"):
        raise CheckpointError(f"{where}: resample={resample!r} is not supported (only 3 = bicubic)")


def _int(cfg: dict, key: str, where: str) -> int | None:
    v = cfg.get(key)
    if v is None:
        return None
    # (a float is taken when whole: 12.0; Infinity and NaN, which Python's JSON reader accepts, are not)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v or v < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
    return int(v)


def _floats(cfg: dict, key: str, where: str) -> tuple[float, ...] | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3  # transformers broadcasts a scalar mean/std over the channels
    if not isinstance(v, (list, tuple)) or len(v) != 3 or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise CheckpointError(f"{where}: {key} must be three finite numbers, got {v!r}")
    if key == "image_std" and not all(x > 0 for x in v):  # pixels are divided by it
        raise CheckpointError(f"{where}: {key} must be three numbers > 0, got {v!r}")
    return tuple(float(x) for x in v)


def _tile_side(cfg: dict, where: str) -> int | None:
    """The tile side from `size` in the forms checkpoints write it: {"height", "width"} (transformers' GotOcr2),
    a bare int or [height, width], or {"shortest_edge"} with a center crop to the same side (OpenGVLab's
    CLIP-style preprocessor_config.json)."""
    if "size" not in cfg:
        return None
    size = cfg["size"]
    if isinstance(size, dict) and ("height" in size or "width" in size):
        h, w = size.get("height"), size.get("width")
    elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
        h = w = size["shortest_edge"]
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
    else:
        h = w = size
    if h != w or isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise CheckpointError(f"{where}: size must be one square tile side, got {size!r}")
    crop = cfg.get("crop_size")
    if cfg.get("do_center_crop") and crop is not None:
        crop_side = crop.get("height", crop.get("width")) if isinstance(crop, dict) else crop
        if crop_side != h:
            raise CheckpointError(f"{where}: size {size!r} and crop_size {crop!r} give different tile sides")
    return h
