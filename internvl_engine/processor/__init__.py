"""InternVL3 processor: chat template, image/video preprocessing and placeholder expansion, matching
transformers 5.24's InternVLProcessor (PIL image backend, torchvision video backend) without importing it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import PIL.Image
import torch

from ..constants import IMAGE_SEQ_LENGTH, MAX_TILES, MIN_TILES, TILE_SIZE
from ..errors import CheckpointError, ImageError, MediaPolicyError, PromptError, VideoError
from .detail import LowDetail, unwrap as unwrap_detail
from .files import read_processor_settings
from .images import (IMAGENET_MEAN, IMAGENET_STD, content_digest, describe_source, image_grids_u8, load_image,
                     normalize_grids, num_tiles, preprocess_image, to_rgb_array, validate_tile_limits)
from .media import MediaPolicy
from .messages import normalize_messages, split_media
from .reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning
from .template import (DEFAULT_CHAT_TEMPLATE, THINKING_SWITCH, THINKING_SYSTEM_PROMPT, ChatTemplate,
                       load_chat_template)
from .tokenizer import IncrementalDetokenizer, Tokenizer, build_internvl3_tokenizer_json
from .video import (check_num_frames, load_video, normalize_frames, preprocess_video, sample_frame_indices,
                    video_frame_u8)

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = [
    "Encoding",
    "LowDetail",
    "MediaPolicy",
    "Processor",
    "Tokenizer",
    "IncrementalDetokenizer",
    "ChatTemplate",
    "DEFAULT_CHAT_TEMPLATE",
    "build_internvl3_tokenizer_json",
    "load_chat_template",
    "THINKING_SYSTEM_PROMPT",
    "ReasoningParser",
    "prompt_opens_thinking",
    "split_reasoning",
    "normalize_messages",
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
    # per num_patches entry, the [start, end) of its <IMG_CONTEXT> run in input_ids (num_patches[i] * image_seq_length
    # ids): the rows its vision features replace
    image_spans: list[tuple[int, int]] = field(default_factory=list)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _first(*values):
    return next(v for v in values if v is not None)


def _missing_tokenizer(d: Path) -> CheckpointError:
    """A checkpoint without tokenizer.json (the one form read here, with the `tokenizers` library), named by what it
    ships instead: OpenGVLab's InternLM-based originals only a SentencePiece tokenizer.model (read by their remote
    code; no maintained reader is installed), the Qwen-based ones may ship vocab.json + merges.txt."""
    if (d / "tokenizer.model").is_file():
        return CheckpointError(
            f"{d}: the tokenizer is SentencePiece only (tokenizer.model, read by OpenGVLab's remote code), and this "
            "engine reads tokenizer.json: serve the checkpoint's converted -hf form (OpenGVLab's <name>-hf, or "
            "transformers' convert_internvl_weights_to_hf.py), which ships one")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return CheckpointError(
            f"{d}: no tokenizer.json (only vocab.json + merges.txt), which this engine reads: write it once with "
            "transformers (AutoTokenizer.from_pretrained(path).save_pretrained(path)), or serve the -hf form")
    return CheckpointError(f"tokenizer file not found: {d / 'tokenizer.json'}")


class Processor:
    """Conversation or raw prompt + media -> Encoding. Built from a checkpoint's files (from_pretrained) or from
    parts (from_parts). Given the model's config (model_config=), the settings no file states follow the model
    (tile size = vision image_size, image_seq_length = its tokens per tile, its tiling limits), and stated settings
    that disagree with the model raise CheckpointError naming both sources."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        *,
        image_seq_length: int | None = None,
        tile_size: int | None = None,
        image_mean=None,
        image_std=None,
        min_tiles: int | None = None,
        max_tiles: int | None = None,
        video_size: int | None = None,
        video_mean=None,
        video_std=None,
        model_config: "ModelConfig | None" = None,
        origin: Mapping[str, str] | None = None,
        media_policy: MediaPolicy | None = None,
    ):
        """origin: where each given setting came from ("tile_size" -> a file name ...), for error messages.
        media_policy: what media may be read and how much (None: MediaPolicy(), which trusts the caller); kept as
        the plain attribute `media_policy`, read at each call, which an owner (the engine) may replace."""
        m = model_config
        self.tokenizer = tokenizer
        if media_policy is not None and not isinstance(media_policy, MediaPolicy):
            raise MediaPolicyError(f"media_policy must be a MediaPolicy, got {type(media_policy).__name__}")
        self.media_policy = media_policy if media_policy is not None else MediaPolicy()
        self.template = ChatTemplate(chat_template)
        self.model_config = m
        # each setting: as given, else as the model says, else the InternVL3 default
        self.image_seq_length = int(_first(image_seq_length, m and m.image_seq_length, IMAGE_SEQ_LENGTH))
        self.tile_size = int(_first(tile_size, m and m.vision.image_size, TILE_SIZE))
        min_tiles = _first(min_tiles, m and m.min_tiles, MIN_TILES)
        max_tiles = _first(max_tiles, m and m.max_tiles, MAX_TILES)
        self.image_mean = tuple(float(x) for x in _first(image_mean, IMAGENET_MEAN))
        self.image_std = tuple(float(x) for x in _first(image_std, IMAGENET_STD))
        validate_tile_limits(min_tiles, max_tiles)
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.video_size = int(video_size) if video_size is not None else self.tile_size
        self.video_mean = tuple(float(x) for x in (video_mean if video_mean is not None else self.image_mean))
        self.video_std = tuple(float(x) for x in (video_std if video_std is not None else self.image_std))
        self._pattern = re.compile(
            f"(?P<image>{re.escape(tokenizer.image_token)})|(?P<video>{re.escape(tokenizer.video_token)})"
        )
        if m is not None:
            self._check_model_agreement(m, dict(origin or {}))

    def _check_model_agreement(self, m: "ModelConfig", origin: dict[str, str]) -> None:
        """A processor that disagrees with the model feeds it tiles of the wrong size, or a number of
        <IMG_CONTEXT> rows other than the features it makes; refuse it at load."""
        model = m.source or "the model config"
        given = "given to the Processor"
        v = m.vision
        for what, key, side in (("tile", "tile_size", self.tile_size), ("video frame", "video_size", self.video_size)):
            if side != v.image_size:
                raise CheckpointError(
                    f"processor {what} size {side} ({origin.get(key, given)}) does not match the vision tower's "
                    f"image_size {v.image_size} ({model})")
        if self.image_seq_length != m.image_seq_length:
            raise CheckpointError(
                f"processor image_seq_length {self.image_seq_length} ({origin.get('image_seq_length', given)}) does "
                f"not match the model's {m.image_seq_length} tokens per tile ({model}: image_size {v.image_size}, "
                f"patch_size {v.patch_size}, downsample_ratio {m.downsample_ratio})")
        tok_id = self.tokenizer.image_token_id
        if tok_id != m.image_token_id:
            raise CheckpointError(
                f"{self.tokenizer.image_token} is id {tok_id} in the tokenizer "
                f"({origin.get('image_token_id', given)}) but image_token_id is {m.image_token_id} ({model})")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_parts(
        cls,
        tokenizer_json: dict | Tokenizer | None = None,
        chat_template: str | None = None,
        image_seq_length: int | None = None,
        tile_size: int | None = None,
        *,
        model_config: "ModelConfig | None" = None,
        media_policy: MediaPolicy | None = None,
        **kwargs,
    ) -> "Processor":
        """Settings left None follow model_config when given, else the InternVL3 defaults (constants)."""
        if tokenizer_json is None:
            tokenizer_json = build_internvl3_tokenizer_json()
        tok = tokenizer_json if isinstance(tokenizer_json, Tokenizer) else Tokenizer(tokenizer_json)
        return cls(tok, chat_template, image_seq_length=image_seq_length, tile_size=tile_size,
                   model_config=model_config, media_policy=media_policy, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *, model_config: "ModelConfig | None" = None,
                        media_policy: MediaPolicy | None = None) -> "Processor":
        """From a checkpoint directory's tokenizer, chat template and processor files (every form
        read_processor_settings knows). With model_config (the same checkpoint's ModelConfig), what the files
        leave out follows the model, and what they state must agree with it."""
        d = Path(path)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise _missing_tokenizer(d)
        s = read_processor_settings(d)
        tokenizer = Tokenizer(tok_path, model_max_length=s.model_max_length)
        settings = {f.name: getattr(s, f.name) for f in fields(s) if f.name not in ("model_max_length", "where")}
        origin = {**s.where, "image_token_id": str(tok_path)}
        return cls(tokenizer, load_chat_template(d), model_config=model_config, origin=origin,
                   media_policy=media_policy, **settings)

    # ---------------------------------------------------------------- prompt
    @property
    def thinking_mode(self) -> str | None:
        """How this model's thinking is switched on: "template" (its chat template reads enable_thinking),
        "system_prompt" (a Qwen3 decoder, i.e. InternVL3.5, whose switch is THINKING_SYSTEM_PROMPT as the system
        message), or None (no thinking mode: InternVL3 and 2.5 were not trained to think)."""
        if self.template.has_thinking_switch:
            return "template"
        if self.model_config is not None and self.model_config.text.model_type == "qwen3":
            return "system_prompt"
        return None

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True,
                            chat_template_kwargs: Mapping | None = None) -> str:
        """The rendered prompt; chat_template_kwargs: template variables (vLLM's and transformers' name), with
        enable_thinking as the model's thinking switch (thinking_mode)."""
        messages, _ = split_media(normalize_messages(conversation))
        return self._render(messages, add_generation_prompt, chat_template_kwargs)

    def render_request(self, conversation, chat_template_kwargs: Mapping | None = None,
                       add_generation_prompt: bool = True) -> dict:
        """The raw request {"prompt", "images", "videos"} that encodes exactly as the conversation rendered with
        chat_template_kwargs (the same placeholders, the media in the same order): how a front end hands template
        variables to the engine, whose intake renders conversations without any."""
        messages, media = split_media(normalize_messages(conversation))
        return {"prompt": self._render(messages, add_generation_prompt, chat_template_kwargs),
                "images": self._merge_media("image", [s for k, s in media if k == "image"], []),
                "videos": self._merge_media("video", [s for k, s in media if k == "video"], [])}

    def with_template_variables(self, request, chat_template_kwargs: Mapping | None,
                                add_generation_prompt: bool = True):
        """A front end's request as the engine takes it: unchanged without chat_template_kwargs, else the
        conversation (a string is one user message) rendered by render_request; a raw prompt takes none."""
        if chat_template_kwargs is None:
            return request
        if isinstance(request, dict):
            raise PromptError("chat_template_kwargs apply to a conversation, not to a raw prompt")
        if isinstance(request, str):
            request = [{"role": "user", "content": request}]
        return self.render_request(request, chat_template_kwargs, add_generation_prompt)

    def _render(self, messages, add_generation_prompt: bool, chat_template_kwargs: Mapping | None = None) -> str:
        messages, variables = self._thinking(messages, _template_variables(chat_template_kwargs))
        return self.template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            **{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **variables},
        )

    def _thinking(self, messages: list[dict], variables: dict) -> tuple[list[dict], dict]:
        """enable_thinking as this model switches thinking: a template that reads it gets it; InternVL3.5 gets its
        thinking system prompt when true; a model without a thinking mode refuses true (a request for what the
        model cannot do is an error, not a silent no-op) and takes false as what it does anyway."""
        thinking = variables.get(THINKING_SWITCH)
        if thinking is None:
            return messages, variables
        if not isinstance(thinking, bool):
            raise PromptError(f"chat_template_kwargs.{THINKING_SWITCH} must be true or false, got {thinking!r}")
        mode = self.thinking_mode
        if mode == "template" or not thinking:
            return messages, variables
        if mode is None:
            text = self.model_config.text.model_type if self.model_config is not None else "unknown"
            raise PromptError(f"chat_template_kwargs.{THINKING_SWITCH}: this model has no thinking mode (its "
                              f"decoder is {text!r} and its chat template reads no {THINKING_SWITCH}); thinking is "
                              "InternVL3.5's (a qwen3 decoder)")
        if messages and messages[0]["role"] == "system":
            raise PromptError(f"chat_template_kwargs.{THINKING_SWITCH}: InternVL3.5 thinks under its own system "
                              "prompt, and the conversation already has a system message; drop one of the two")
        return [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages], variables

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
        min_t, max_t = self._tile_limits(min_num_tiles, max_num_tiles)
        prompt, images, videos = self._gather(conversation, text, images, videos, add_generation_prompt)
        self._check_placeholders(prompt, images, videos)
        image_tiles, video_frames = self._load(images, videos, min_t, max_t, num_frames)
        return self._expand(prompt, image_tiles, video_frames)

    # ---------------------------------------------------------------- steps of __call__
    def _tile_limits(self, min_num_tiles: int | None, max_num_tiles: int | None) -> tuple[int, int]:
        max_t = self.max_tiles if max_num_tiles is None else max_num_tiles
        min_t = self.min_tiles if min_num_tiles is None else min_num_tiles
        if min_num_tiles is None and max_num_tiles is not None:
            min_t = min(min_t, max_t)  # a caller's lower max_num_tiles wins over the checkpoint's min_patches
        validate_tile_limits(min_t, max_t)
        return min_t, max_t

    def _gather(self, conversation, text, images, videos, add_generation_prompt: bool) -> tuple[str, list, list]:
        """(prompt, images, videos): the rendered conversation or the raw text, and the media in text order, from
        the conversation's items or from images=/videos=."""
        images = self._as_list(images, "images")
        videos = self._as_list(videos, "videos")
        if conversation is not None:
            if text is not None:
                raise PromptError("pass either a conversation or text=, not both")
            messages, media = split_media(normalize_messages(conversation))
            prompt = self._render(messages, add_generation_prompt)
            images = self._merge_media("image", [s for k, s in media if k == "image"], images)
            videos = self._merge_media("video", [s for k, s in media if k == "video"], videos)
            return prompt, images, videos
        if text is not None:
            if not isinstance(text, str):
                raise PromptError(f"text must be a string, got {type(text).__name__}")
            return text, images, videos
        raise PromptError("nothing to encode: pass a conversation or text=")

    def _check_placeholders(self, prompt: str, images: list, videos: list) -> None:
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

    def _load(self, images: list, videos: list, min_t: int, max_t: int, num_frames: int | None):
        """([(float32 tiles, digest)] per image, [(float32 frames, digest per frame)] per video), in order, under
        the media policy: counts refused before any medium is read, tiles and frames as each medium's are known."""
        policy = self.media_policy
        num_frames = check_num_frames(num_frames) if videos else num_frames
        policy.check_image_count(len(images))
        # every image makes at least one tile (min_t + 1 with its thumbnail when min_t > 1)
        policy.check_tiles(len(images) * (1 if max_t <= 1 or min_t <= 1 else min_t + 1),
                           f"{_plural(len(images), 'image')} make at least")
        if num_frames is not None:  # each video then keeps exactly num_frames (or fails)
            policy.check_video_frames(len(videos) * num_frames,
                                      f"{_plural(len(videos), 'video')} of num_frames={num_frames} make")
        image_tiles, tiles = [], 0
        for i, src in enumerate(images):
            image_tiles.append(self._image_tiles(i, src, min_t, max_t, tiles))
            tiles += image_tiles[-1][0].shape[0]
        video_frames, frames = [], 0
        for i, src in enumerate(videos):
            video_frames.append(self._video_frames(i, src, num_frames, frames))
            frames += video_frames[-1][0].shape[0]
        return image_tiles, video_frames

    def _expand(self, prompt: str, image_tiles: list[tuple[torch.Tensor, bytes]],
                video_frames: list[tuple[torch.Tensor, list[bytes]]]) -> Encoding:
        """Placeholder expansion (InternVLProcessor.replace_image_token / replace_video_token) built directly as
        ids, recording where each <IMG_CONTEXT> run lands. Every boundary is an added special token, which splits
        the text before pre-tokenisation, so per-segment tokenisation equals tokenising the expanded string."""
        tok = self.tokenizer
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        num_patches: list[int] = []
        digests: list[bytes] = []
        pixel_parts: list[torch.Tensor] = []

        def image_block(text: str, tiles: int) -> None:
            ids.extend(tok.encode(text) if text else [])
            ids.append(tok.start_image_token_id)
            start = len(ids)
            ids.extend([tok.image_token_id] * (tiles * self.image_seq_length))
            spans.append((start, len(ids)))
            num_patches.append(tiles)
            ids.append(tok.end_image_token_id)

        images, videos = iter(image_tiles), iter(video_frames)
        pos = 0
        for m in self._pattern.finditer(prompt):
            text = prompt[pos : m.start()]  # plain text waiting to be tokenised with whatever follows it
            pos = m.end()
            if m.lastgroup == "image":
                tiles, digest = next(images)
                image_block(text, tiles.shape[0])
                digests.append(digest)
                pixel_parts.append(tiles)
            else:
                frames, frame_digests = next(videos)
                for f in range(frames.shape[0]):
                    # "Frame1: " joins the text before the placeholder in one segment, as in the expanded string
                    image_block(text + (f"Frame{f + 1}: " if f == 0 else f"\nFrame{f + 1}: "), 1)
                    text = ""
                digests += frame_digests
                pixel_parts.append(frames)
        if pos < len(prompt):
            ids += tok.encode(prompt[pos:])
        pixel_values = (pixel_parts[0] if len(pixel_parts) == 1 else torch.cat(pixel_parts, 0)) if pixel_parts else None
        return Encoding(input_ids=ids, pixel_values=pixel_values, num_patches=num_patches, prompt=prompt,
                        media_digests=digests, image_spans=spans)

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

    def _image_tiles(self, index: int, source, min_t: int, max_t: int, tiles_before: int = 0
                     ) -> tuple[torch.Tensor, bytes]:
        """(float32 tiles, content digest of the image's uint8 tiles); its tiles counted against the media policy
        (with tiles_before already in the request) before any resizing."""
        policy = self.media_policy
        source, min_t, max_t = unwrap_detail(source, min_t, max_t)  # detail "low": one tile
        try:
            image = load_image(source, policy) if isinstance(source, (str, Path)) else source
            size = _image_size(image)
            if size is not None:
                if image is source:  # (a path, URL or data: URI met the size limits from its header)
                    policy.check_image_size(*size, f"image {describe_source(image)}")
                n = num_tiles(*size, min_t, max_t, self.tile_size)
                policy.check_tiles(tiles_before + n, f"its {n} tiles bring the request to")
            grids = image_grids_u8(image, tile=self.tile_size, min_tiles=min_t, max_tiles=max_t)
        except (ImageError, MediaPolicyError) as e:
            raise type(e)(f"image {index}: {e}") from e
        digest = content_digest(grids, tuple(self.image_mean), tuple(self.image_std))
        return torch.from_numpy(normalize_grids(grids, self.tile_size, self.image_mean, self.image_std)), digest

    def _video_frames(self, index: int, source, num_frames: int | None, frames_before: int = 0
                      ) -> tuple[torch.Tensor, list[bytes]]:
        """(float32 frames, content digest of each uint8 frame); only the sampled frames are decoded into memory,
        after their count passed the media policy."""
        policy = self.media_policy
        try:
            check = None if policy.max_video_frames is None else (
                lambda n: policy.check_video_frames(frames_before + n, f"its {n} frames bring the request to"))
            # each frame resized as it is decoded: one full-size frame held at a time, not num_frames of them
            resize = functools.partial(video_frame_u8, size=self.video_size)
            frames = load_video(source, num_frames, policy=policy, on_frames=check,  # (no check: no counting pass)
                                transform=resize)
            u8 = torch.stack(frames)
        except (VideoError, MediaPolicyError) as e:
            raise type(e)(f"video {index}: {e}") from e
        params = (tuple(self.video_mean), tuple(self.video_std))
        digests = [content_digest(f.numpy(), *params) for f in u8]
        return normalize_frames(u8, self.video_mean, self.video_std), digests


def _template_variables(kwargs) -> dict:
    """chat_template_kwargs as template variables: a dict of names, none of them one the processor itself sets."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise PromptError(f"chat_template_kwargs must be a dict of variable names, got {type(kwargs).__name__}")
    reserved = sorted(set(kwargs) & {"messages", "add_generation_prompt"})
    if reserved:
        raise PromptError(f"chat_template_kwargs may not set {reserved}: the conversation and the request set them")
    return dict(kwargs)


def _image_size(image) -> tuple[int, int] | None:
    """(width, height) of a loaded image or a valid array; None when image_grids_u8 is to report the problem."""
    if isinstance(image, PIL.Image.Image):
        try:
            w, h = image.size
        except Exception:  # a caller's broken object: to_rgb_array names the failure
            return None
    elif isinstance(image, np.ndarray) and image.ndim in (2, 3):
        h, w = image.shape[:2]
    else:
        return None
    return (w, h) if w > 0 and h > 0 else None
