"""InternVL3 processor: chat template, image/video preprocessing and placeholder expansion, matching
transformers 5.24's InternVLProcessor (PIL image backend, torchvision video backend) without importing it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ImageError, InternVLEngineError, PromptError, VideoError
from .images import (IMAGENET_MEAN, IMAGENET_STD, content_digest, image_grids_u8, load_image, normalize_grids,
                     preprocess_image, to_rgb_array, validate_tile_limits)
from .template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template, normalize_messages
from .tokenizer import IncrementalDetokenizer, Tokenizer, build_internvl3_tokenizer_json
from .video import load_video, normalize_frames, preprocess_video, sample_frame_indices, video_frames_u8

__all__ = [
    "Encoding",
    "Processor",
    "Tokenizer",
    "IncrementalDetokenizer",
    "ChatTemplate",
    "DEFAULT_CHAT_TEMPLATE",
    "build_internvl3_tokenizer_json",
    "load_chat_template",
    "load_image",
    "to_rgb_array",
    "preprocess_image",
    "load_video",
    "preprocess_video",
    "sample_frame_indices",
]


@dataclass
class Encoding:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # float32 [T,3,S,S], images and video frames in text order
    num_patches: list[int] = field(default_factory=list)  # tiles per image, 1 per video frame, in text order
    prompt: str = ""  # rendered text before placeholder expansion
    media_digests: list[bytes] = field(default_factory=list)  # content_digest per num_patches entry


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _size_of(cfg: dict, default: int, path: Path) -> int:
    size = cfg.get("size", default)
    if isinstance(size, dict):
        h, w = size.get("height"), size.get("width")
        if h is None or w is None or h != w:
            raise CheckpointError(f"{path}: size must be a square {{height, width}}, got {size}")
        return int(h)
    return int(size)


class Processor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        *,
        image_seq_length: int = 256,
        tile_size: int = 448,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        min_tiles: int = 1,
        max_tiles: int = 12,
        video_size: int | None = None,
        video_mean=None,
        video_std=None,
    ):
        self.tokenizer = tokenizer
        self.template = ChatTemplate(chat_template)
        self.image_seq_length = int(image_seq_length)
        self.tile_size = int(tile_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        validate_tile_limits(min_tiles, max_tiles)
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.video_size = int(video_size) if video_size is not None else self.tile_size
        self.video_mean = tuple(float(x) for x in (video_mean if video_mean is not None else self.image_mean))
        self.video_std = tuple(float(x) for x in (video_std if video_std is not None else self.image_std))
        self._pattern = re.compile(
            f"(?P<image>{re.escape(tokenizer.image_token)})|(?P<video>{re.escape(tokenizer.video_token)})"
        )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_parts(
        cls,
        tokenizer_json: dict | Tokenizer | None = None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        tile_size: int = 448,
        **kwargs,
    ) -> "Processor":
        if tokenizer_json is None:
            tokenizer_json = build_internvl3_tokenizer_json()
        tok = tokenizer_json if isinstance(tokenizer_json, Tokenizer) else Tokenizer(tokenizer_json)
        return cls(tok, chat_template, image_seq_length=image_seq_length, tile_size=tile_size, **kwargs)

    @classmethod
    def from_pretrained(cls, path) -> "Processor":
        d = Path(path)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"tokenizer file not found: {tok_path}")
        model_max_length = None
        if (d / "tokenizer_config.json").is_file():
            model_max_length = _read_json(d / "tokenizer_config.json").get("model_max_length")
        tokenizer = Tokenizer(tok_path, model_max_length=model_max_length)
        kwargs: dict = {}
        p = d / "preprocessor_config.json"
        if p.is_file():
            cfg = _read_json(p)
            kwargs["tile_size"] = _size_of(cfg, 448, p)
            resample = cfg.get("resample", 3)
            if resample not in (3, "bicubic", "BICUBIC"):
                raise CheckpointError(f"{p}: resample={resample!r} is not supported (only 3 = bicubic)")
            if "image_mean" in cfg:
                kwargs["image_mean"] = cfg["image_mean"]
            if "image_std" in cfg:
                kwargs["image_std"] = cfg["image_std"]
            kwargs["min_tiles"] = int(cfg.get("min_patches", 1))
            kwargs["max_tiles"] = int(cfg.get("max_patches", 12))
        p = d / "processor_config.json"
        if p.is_file():
            kwargs["image_seq_length"] = int(_read_json(p).get("image_seq_length", 256))
        p = d / "video_preprocessor_config.json"
        if p.is_file():
            cfg = _read_json(p)
            kwargs["video_size"] = _size_of(cfg, kwargs.get("tile_size", 448), p)
            kwargs["video_mean"] = cfg.get("image_mean")
            kwargs["video_std"] = cfg.get("image_std")
        return cls(tokenizer, load_chat_template(d), **kwargs)

    # ---------------------------------------------------------------- prompt
    def apply_chat_template(self, conversation, add_generation_prompt: bool = True) -> str:
        messages, _ = normalize_messages(conversation)
        return self._render(messages, add_generation_prompt)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )

    # ---------------------------------------------------------------- main entry
    def __call__(
        self,
        conversation=None,
        *,
        text: str | None = None,
        images=None,
        videos=None,
        add_generation_prompt: bool = True,
        max_num_tiles: int | None = None,
        min_num_tiles: int | None = None,
        num_frames: int | None = None,
    ) -> Encoding:
        max_t = self.max_tiles if max_num_tiles is None else max_num_tiles
        min_t = self.min_tiles if min_num_tiles is None else min_num_tiles
        if min_num_tiles is None and max_num_tiles is not None:
            min_t = min(min_t, max_t)
        validate_tile_limits(min_t, max_t)
        images = self._as_list(images, "images")
        videos = self._as_list(videos, "videos")

        if conversation is not None:
            if text is not None:
                raise PromptError("pass either a conversation or text=, not both")
            messages, media = normalize_messages(conversation)
            prompt = self._render(messages, add_generation_prompt)
            images = self._merge_media("image", [s for k, s in media if k == "image"], images)
            videos = self._merge_media("video", [s for k, s in media if k == "video"], videos)
        elif text is not None:
            if not isinstance(text, str):
                raise PromptError(f"text must be a string, got {type(text).__name__}")
            prompt = text
        else:
            raise PromptError("nothing to encode: pass a conversation or text=")

        order = [m.lastgroup for m in self._pattern.finditer(prompt)]
        n_img_ph, n_vid_ph = order.count("image"), order.count("video")
        if n_img_ph != len(images):
            raise PromptError(
                f"{_plural(n_img_ph, 'image placeholder')} ({self.tokenizer.image_token}) but {_plural(len(images), 'image')}"
            )
        if n_vid_ph != len(videos):
            raise PromptError(
                f"{_plural(n_vid_ph, 'video placeholder')} ({self.tokenizer.video_token}) but {_plural(len(videos), 'video')}"
            )

        image_tiles = [self._image_tiles(i, src, min_t, max_t) for i, src in enumerate(images)]
        video_frames = [self._video_frames(i, src, num_frames) for i, src in enumerate(videos)]

        # Expansion (InternVLProcessor.replace_image_token / replace_video_token) built directly as ids: every
        # boundary is an added special token, which splits the text before pre-tokenisation, so per-segment
        # tokenisation equals tokenising the expanded string.
        tok = self.tokenizer
        ctx_run = [tok.image_token_id] * self.image_seq_length
        ids: list[int] = []
        pixel_parts: list[torch.Tensor] = []
        digests: list[bytes] = []
        num_patches: list[int] = []
        pos = 0
        ii = vi = 0
        for m in self._pattern.finditer(prompt):
            text = prompt[pos : m.start()]  # plain text waiting to be tokenised with whatever follows it
            pos = m.end()
            if m.lastgroup == "image":
                tiles, digest = image_tiles[ii]
                ii += 1
                t = tiles.shape[0]
                digests.append(digest)
                ids += (tok.encode(text) if text else []) + [tok.start_image_token_id] + ctx_run * t + [
                    tok.end_image_token_id]
                pixel_parts.append(tiles)
                num_patches.append(t)
            else:
                frames, frame_digests = video_frames[vi]
                vi += 1
                digests += frame_digests
                for f in range(frames.shape[0]):
                    # "Frame1: " joins the text before the placeholder in one segment, as in the expanded string
                    ids += tok.encode(text + (f"Frame{f + 1}: " if f == 0 else f"\nFrame{f + 1}: "))
                    ids += [tok.start_image_token_id] + ctx_run + [tok.end_image_token_id]
                    num_patches.append(1)
                    text = ""
                pixel_parts.append(frames)
        if pos < len(prompt):
            ids += tok.encode(prompt[pos:])
        pixel_values = (pixel_parts[0] if len(pixel_parts) == 1 else torch.cat(pixel_parts, 0)) if pixel_parts else None
        return Encoding(input_ids=ids, pixel_values=pixel_values, num_patches=num_patches, prompt=prompt,
                        media_digests=digests)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _as_list(x, name: str) -> list:
        if x is None:
            return []
        if isinstance(x, (list, tuple)):
            return list(x)
        if name == "videos" and isinstance(x, np.ndarray) and x.ndim == 4:
            return [x]
        return [x]

    @staticmethod
    def _merge_media(kind: str, from_conv: list, given: list) -> list:
        if not given:
            missing = [i for i, s in enumerate(from_conv) if s is None]
            if missing:
                raise PromptError(
                    f"{kind} item {missing[0]} of the conversation has no source and no {kind}s= were passed"
                )
            return from_conv
        if any(s is not None for s in from_conv):
            raise PromptError(f"{kind}s given both inside the conversation and via {kind}s=; use one or the other")
        if len(from_conv) != len(given):
            raise PromptError(
                f"{_plural(len(from_conv), kind + ' placeholder')} in the conversation but {_plural(len(given), kind)}"
            )
        return given

    def _image_tiles(self, index: int, source, min_t: int, max_t: int) -> tuple[torch.Tensor, bytes]:
        """(float32 tiles, content digest of the image's uint8 tiles)."""
        try:
            grids = image_grids_u8(source, tile=self.tile_size, min_tiles=min_t, max_tiles=max_t)
        except ImageError as e:
            raise ImageError(f"image {index}: {e}") from e
        digest = content_digest(grids, tuple(self.image_mean), tuple(self.image_std))
        return torch.from_numpy(normalize_grids(grids, self.tile_size, self.image_mean, self.image_std)), digest

    def _video_frames(self, index: int, source, num_frames: int | None) -> tuple[torch.Tensor, list[bytes]]:
        """(float32 frames, content digest of each uint8 frame)."""
        try:
            frames = load_video(source)
            if num_frames is not None:
                frames = [frames[i] for i in sample_frame_indices(len(frames), num_frames)]
            u8 = video_frames_u8(frames, size=self.video_size)
        except VideoError as e:
            raise VideoError(f"video {index}: {e}") from e
        params = (tuple(self.video_mean), tuple(self.video_std))
        digests = [content_digest(f.numpy(), *params) for f in u8]
        return normalize_frames(u8, self.video_mean, self.video_std), digests
