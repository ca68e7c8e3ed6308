"""Video decoding, frame sampling and per-frame preprocessing, identical to transformers'
InternVLVideoProcessor (torchvision backend on CPU); spec section 6."""

from __future__ import annotations

import functools
import operator
import os
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..constants import TILE_SIZE
from ..errors import ImageError, MediaPolicyError, VideoError, VideoFormatError
from .images import DEFAULT_POLICY, IMAGENET_MEAN, IMAGENET_STD, describe_source, load_image, to_rgb_array
from .media import MediaPolicy


def _import_av(name: str):
    try:
        import av
    except ImportError as e:
        raise VideoError(
            f"decoding video {name} needs PyAV: pip install av (or install internvl_engine with the `video` extra)"
        ) from e
    return av


def _frame_to_rgb(frame) -> np.ndarray:
    """A decoded frame as uint8 HxWx3: the one place a video frame becomes an array."""
    return frame.to_ndarray(format="rgb24")


def _max_pixels(policy: MediaPolicy) -> int | None:
    """The frame size ffmpeg's decoders may allocate (its max_pixels option, at most INT_MAX), from the policy."""
    caps = [c for c in (policy.max_image_pixels, policy.max_image_side and policy.max_image_side ** 2)
            if c is not None]
    return min(caps + [2**31 - 1]) if caps else None


def _open(av, path: str, name: str, policy: MediaPolicy):
    """The container, opened by one of the policy's single-file demuxers from the local file protocol only.
    avformat_find_stream_info (inside av.open) would decode a frame of some codecs (H.264: a 9000 x 9000 frame
    took 190 MB) before the stream's size can be checked; skip_frame=all keeps it to the headers, which still give
    the size. The decoder that decodes the frames later refuses any frame over the policy's size (max_pixels)."""
    options = {"protocol_whitelist": "file", "skip_frame": "all"}
    if policy.video_formats is not None:
        options["format_whitelist"] = ",".join(policy.video_formats)
    cap = _max_pixels(policy)
    try:
        container = av.open(path, options=options)
    except av.error.ArgumentError as e:  # EINVAL: what ffmpeg returns for a demuxer off the whitelist
        if policy.video_formats is None:
            raise
        raise VideoFormatError(f"video {name} is not in an allowed single-file container format{_what_file(path)} "
                               f"(media_policy.video_formats = {list(policy.video_formats)})") from e
    if cap is not None:
        for s in container.streams.video:
            if s.codec_context is not None:
                s.codec_context.options = {"max_pixels": str(cap)}  # a stream whose frames grow midway
    return container


def _what_file(path: str) -> str:
    """For the refusal's message: what a file that opens other files looks like."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return ""
    if head.startswith(b"#EXTM3U"):
        return " (it is an M3U/HLS playlist, which opens the files and URLs it lists)"
    if head.startswith(b"ffconcat"):
        return " (it is an ffmpeg concat list, which opens the files it lists)"
    return ""


def _check_frame_size(frame_or_stream, name: str, policy: MediaPolicy) -> None:
    w, h = int(frame_or_stream.width or 0), int(frame_or_stream.height or 0)
    if w and h:
        policy.check_image_size(w, h, f"video {name} frame")


def _container_frame_count(av, path: str, name: str, policy: MediaPolicy = DEFAULT_POLICY) -> int:
    """The first video stream's frame count as the container states it (0 when it does not), after its frame size,
    from the stream's header, passed the policy."""
    with _open(av, path, name, policy) as container:
        if not container.streams.video:
            raise VideoError(f"video {name} has no video stream")
        stream = container.streams.video[0]
        _check_frame_size(stream, name, policy)
        return int(stream.frames or 0)


def _keep(frame: np.ndarray, transform) -> tuple[tuple, object]:
    """(the full frame's shape, for load_video's same-shape check; the frame as kept: transform(frame) or itself)."""
    return frame.shape, frame if transform is None else transform(frame)


def _decode(av, path: str, keep, on_kept=None, name: str = "", policy: MediaPolicy = DEFAULT_POLICY,
            transform=None) -> tuple[dict[int, tuple], int]:
    """Decode the whole stream, converting and holding only the frames keep(index) selects (the others are
    dropped as they come); ({index: (shape, frame)}, frames decoded), each kept frame through _keep as soon as it
    is converted. on_kept(count) after each frame kept. Every frame's size meets the policy (a stream may change
    size midway)."""
    kept: dict[int, tuple] = {}
    n = 0
    with _open(av, path, name, policy) as container:
        stream = container.streams.video[0]
        _check_frame_size(stream, name, policy)
        for frame in container.decode(stream):
            _check_frame_size(frame, name, policy)
            if keep(n):
                kept[n] = _keep(_frame_to_rgb(frame), transform)
                if on_kept is not None:
                    on_kept(len(kept))
            n += 1
    return kept, n


def _decode_file(path: str, name: str, num_frames: int | None = None, on_frames=None,
                 policy: MediaPolicy = DEFAULT_POLICY, transform=None) -> list[tuple]:
    """The (shape, frame) pairs (see _keep) of the frames load_video returns for a file, decoded as a stream. With
    num_frames, only the frames sample_frame_indices picks from the total are converted and kept, so the result
    equals sampling the list of every decoded frame (the total is the container's count, or a first pass's when it
    states none, and is checked against the frames actually decoded: a wrong count means one more pass with the true
    one)."""
    av = _import_av(name)
    decode = functools.partial(_decode, av, path, name=name, policy=policy, transform=transform)
    try:
        total = _container_frame_count(av, path, name, policy)
        if num_frames is None:
            if on_frames is None:  # nothing to check first: one pass, as before
                kept, n = decode(lambda i: True)
                return [kept[i] for i in range(n)]
            total = total or decode(lambda i: False)[1]
            if total:
                on_frames(total)
            # a container that under-counts is caught as its extra frames arrive
            kept, n = decode(lambda i: True, lambda k: k > total and on_frames(k))
            return [kept[i] for i in range(n)]
        if total < num_frames:  # none stated, or too few for this request: count, so a refusal is true
            total = decode(lambda i: False)[1]
        for _attempt in range(2):
            if total == 0:
                raise VideoError(f"video {name} has no frames")
            idx = sample_frame_indices(total, num_frames)
            if on_frames is not None:
                on_frames(len(idx))
            kept, n = decode(set(idx).__contains__)
            if n == total:
                return [kept[i] for i in idx]
            kept = None  # the container's count was wrong: sample again from what decoding gives
            total = n
        raise VideoError(f"video {name} decoded to a different number of frames on each pass")
    except (VideoError, MediaPolicyError):
        raise
    except Exception as e:
        raise VideoError(f"cannot decode video {name}: {type(e).__name__}: {e}") from e


def _select(total: int, num_frames: int | None, name: str, on_frames) -> list[int]:
    """Indices of the frames used (all, or those sampled), checked by on_frames before any is loaded."""
    if total == 0:
        raise VideoError(f"video {name} has no frames")
    idx = list(range(total)) if num_frames is None else sample_frame_indices(total, num_frames)
    if on_frames is not None:
        on_frames(len(idx))
    return idx


def check_num_frames(num_frames) -> int | None:
    """num_frames as an int >= 1 (numpy integers accepted), or None."""
    if num_frames is None:
        return None
    try:
        n = operator.index(num_frames)
    except TypeError:
        n = 0
    if isinstance(num_frames, bool) or n < 1:
        raise VideoError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    return n


def load_video(source, num_frames: int | None = None, *, policy: MediaPolicy | None = None,
               on_frames=None, transform=None) -> list:
    """uint8 HxWx3 RGB frames from a path/file:// URI, a list of frames (arrays, images or image sources), or a
    uint8 [F,H,W,C] array: every frame, or with num_frames the ones sample_frame_indices picks (only those are
    converted, loaded or kept). policy: the media policy for paths and for the frames' sources (None: the
    default, permissive one). on_frames(count): called with the number of frames to be kept before any is
    loaded (and again if decoding finds more than the container said); it may raise to refuse them.
    transform(frame): applied to each kept frame as soon as it is converted, and its results are returned
    instead (the frames' full shapes are still checked to match); the processor resizes there, so a request holds
    one full-size frame at a time rather than every sampled one (64 strict-policy frames of 50 MP were 9.6 GB)."""
    num_frames = check_num_frames(num_frames)
    name = describe_source(source)
    if isinstance(source, (list, tuple)):
        name = f"(list of {len(source)} frames)"
    if isinstance(source, Path):
        source = str(source)
    policy = policy or DEFAULT_POLICY
    if isinstance(source, str):
        path = source
        if source.startswith("file://"):
            path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        elif "://" in source or source.startswith("data:"):
            raise VideoError(f"unsupported video source {name}: only local paths and file:// URIs are supported")
        path = policy.local_path(path, f"video file {name}")
        if not os.path.isfile(path):
            raise VideoError(f"video file not found: {name}")
        frames = _decode_file(path, name, num_frames, on_frames, policy, transform)
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] not in (1, 3, 4):
            raise VideoError(f"video {name}: expected a uint8 array [frames, height, width, channels]")
        policy.check_image_size(source.shape[2], source.shape[1], f"video {name} frame")
        frames = []
        for i in _select(len(source), num_frames, name, on_frames):
            try:
                frames.append(_keep(to_rgb_array(source[i]), transform))
            except ImageError as e:
                raise VideoError(f"video {name}, frame {i}: {e}") from e
    elif isinstance(source, (list, tuple)):
        frames = []
        for i in _select(len(source), num_frames, name, on_frames):
            fr = source[i]
            try:
                if isinstance(fr, np.ndarray) and fr.ndim >= 2:
                    policy.check_image_size(fr.shape[1], fr.shape[0], f"video frame of shape {tuple(fr.shape)}")
                img = fr if isinstance(fr, np.ndarray) else load_image(fr, policy)
                frames.append(_keep(to_rgb_array(img), transform))
            except (ImageError, MediaPolicyError) as e:
                raise (VideoError if isinstance(e, ImageError) else type(e))(f"video frame {i}: {e}") from e
    else:
        raise VideoError(f"unsupported video source {name}: expected a path, a list of frames or a uint8 array")
    if not frames:
        raise VideoError(f"video {name} has no frames")
    shape0 = frames[0][0]
    for i, (shape, _) in enumerate(frames):
        if shape != shape0:
            raise VideoError(f"video {name}: frame {i} has shape {shape}, frame 0 has {shape0}")
    return [fr for _, fr in frames]


def sample_frame_indices(total: int, num_frames: int, initial_shift=True) -> list[int]:
    """Same as InternVLVideoProcessor.sample_frames: torch.arange(shift, total, total/num_frames).int()."""
    if num_frames is None or int(num_frames) < 1:
        raise VideoError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames > total:
        raise VideoError(f"cannot sample num_frames={num_frames} from a video with {total} frames")
    if initial_shift is True:
        initial_shift = total / num_frames / 2
    # torch.arange with python float args (default dtype float32 result; internal double stepping) - call it the same way
    return torch.arange(initial_shift, total, total / num_frames).int().tolist()


def preprocess_video(frames, *, size: int = TILE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """float32 [F, 3, size, size]: uint8 antialiased bicubic resize then fused (x - 255*mean) / (255*std)."""
    return normalize_frames(video_frames_u8(frames, size=size), mean, std)


def normalize_frames(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    rescale_factor = 1 / 255
    m = torch.tensor(list(mean)) * (1.0 / rescale_factor)
    s = torch.tensor(list(std)) * (1.0 / rescale_factor)
    x = x.to(torch.float32)
    return x.sub_(m.view(-1, 1, 1)).div_(s.view(-1, 1, 1))


def video_frames_u8(frames, *, size: int = TILE_SIZE) -> torch.Tensor:
    """uint8 [F, 3, size, size]: the frames after the antialiased bicubic resize, before normalisation."""
    out = [video_frame_u8(fr, size=size, index=i) for i, fr in enumerate(frames)]
    if not out:
        raise VideoError("video has no frames")
    return torch.stack(out)


def video_frame_u8(frame, *, size: int = TILE_SIZE, index: int = 0) -> torch.Tensor:
    """uint8 [3, size, size]: one frame after the antialiased bicubic resize. Frame by frame gives the same bytes
    as InternVLVideoProcessor's resize of the stacked batch (each image plane is resized on its own), and lets
    load_video's transform drop each full-size frame as soon as it is resized."""
    if isinstance(frame, PIL.Image.Image):
        frame = to_rgb_array(frame)
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        raise VideoError(f"video frame {index}: expected uint8, got {a.dtype}")
    if a.ndim == 2 or a.shape[-1] != 3:
        a = to_rgb_array(a)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    return x[0]
