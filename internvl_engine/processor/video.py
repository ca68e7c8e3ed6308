"""Video decoding, frame sampling and per-frame preprocessing, identical to transformers'
InternVLVideoProcessor (torchvision backend on CPU); spec section 6."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..constants import TILE_SIZE
from ..errors import ImageError, VideoError
from .images import IMAGENET_MEAN, IMAGENET_STD, describe_source, load_image, to_rgb_array


def _decode_file(path: str, name: str) -> list[np.ndarray]:
    try:
        import av
    except ImportError as e:
        raise VideoError(
            f"decoding video {name} needs PyAV: pip install av (or install internvl_engine with the `video` extra)"
        ) from e
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"video {name} has no video stream")
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot decode video {name}: {type(e).__name__}: {e}") from e
    return frames


def load_video(source) -> list[np.ndarray]:
    """List of uint8 HxWx3 RGB frames from a path/file:// URI, a list of frames, or a uint8 [F,H,W,C] array."""
    name = describe_source(source)
    if isinstance(source, (list, tuple)):
        name = f"(list of {len(source)} frames)"
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str):
        path = source
        if source.startswith("file://"):
            path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        elif "://" in source:
            raise VideoError(f"unsupported video source {name}: only local paths and file:// URIs are supported")
        if not os.path.isfile(path):
            raise VideoError(f"video file not found: {name}")
        frames = _decode_file(path, name)
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] not in (1, 3, 4):
            raise VideoError(f"video {name}: expected a uint8 array [frames, height, width, channels]")
        frames = []
        for i, fr in enumerate(source):
            try:
                frames.append(to_rgb_array(fr))
            except ImageError as e:
                raise VideoError(f"video {name}, frame {i}: {e}") from e
    elif isinstance(source, (list, tuple)):
        frames = []
        for i, fr in enumerate(source):
            try:
                img = fr if isinstance(fr, np.ndarray) else load_image(fr)
                frames.append(to_rgb_array(img))
            except ImageError as e:
                raise VideoError(f"video frame {i}: {e}") from e
    else:
        raise VideoError(f"unsupported video source {name}: expected a path, a list of frames or a uint8 array")
    if not frames:
        raise VideoError(f"video {name} has no frames")
    shape0 = frames[0].shape
    for i, fr in enumerate(frames):
        if fr.shape != shape0:
            raise VideoError(f"video {name}: frame {i} has shape {fr.shape}, frame 0 has {shape0}")
    return frames


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
    arrs = []
    for i, fr in enumerate(frames):
        if isinstance(fr, PIL.Image.Image):
            fr = to_rgb_array(fr)
        a = np.asarray(fr)
        if a.dtype != np.uint8:
            raise VideoError(f"video frame {i}: expected uint8, got {a.dtype}")
        if a.ndim == 2 or a.shape[-1] != 3:
            a = to_rgb_array(a)
        arrs.append(a)
    if not arrs:
        raise VideoError("video has no frames")
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    return x
