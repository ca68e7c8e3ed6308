"""OpenAI's image `detail`: "low" reads the image as one tile (the whole image resized to one tile, no thumbnail:
max_num_tiles 1 for that image alone, 256 placeholder tokens on InternVL3), "high" and "auto" (the default) as the
model tiles it (up to max_num_tiles, plus the thumbnail). A normalised image item carries "detail": "low" only; its
source reaches the processor wrapped in LowDetail, which the tiling reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PromptError

DETAILS = ("low", "high", "auto")


@dataclass(frozen=True)
class LowDetail:
    """An image source to be read as one tile."""
    source: object


def with_detail(item: dict, detail, where: str) -> dict:
    """The normalised item with its detail checked: "low" kept on an image, "high" / "auto" / None dropped (the
    model's tiling); another value, or a detail on a video, is a PromptError naming `where`."""
    if detail is None:
        return item
    if detail not in DETAILS:
        raise PromptError(f"{where} must be one of {', '.join(DETAILS)}, got {detail!r}")
    if item["type"] != "image":
        raise PromptError(f"{where}: detail applies to images, not to a {item['type']}")
    return {**item, "detail": "low"} if detail == "low" else item


def media_source(item: dict):
    """A normalised image or video item's source as the processor takes it (LowDetail-wrapped for detail "low")."""
    source = item[item["type"]]
    return LowDetail(source) if item.get("detail") == "low" and source is not None else source


def unwrap(source, min_tiles: int, max_tiles: int) -> tuple[object, int, int]:
    """(source, min_tiles, max_tiles) an image is tiled with: one tile for a LowDetail one."""
    return (source.source, 1, 1) if isinstance(source, LowDetail) else (source, min_tiles, max_tiles)
