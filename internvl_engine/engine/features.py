"""Image features of a prefill step: the projector rows of every placeholder span inside each chunk, taken from the
sequence (computed by an earlier chunk), the VisionCache (the same image seen before) or, for the rest, one run of
the vision tower over all of the step's missing images."""
from __future__ import annotations

import time
from typing import Callable

import torch

from .sequence import Sequence
from .vision_cache import VisionCache


class ImageFeatures:
    def __init__(self, runner, vision_cache: VisionCache | None, tokens_per_tile: int,
                 before_tower: Callable[[list[Sequence]], None]):
        """before_tower(seqs) runs before the tower does (the engine names the stage and checks injected faults)."""
        self.runner, self.vision_cache, self.tokens_per_tile = runner, vision_cache, tokens_per_tile
        self.before_tower = before_tower

    def __call__(self, chunks) -> list[torch.Tensor | None]:
        """Feature rows of the placeholders inside each chunk, in span order; runs the vision tower once for every
        needed image that is neither on its sequence nor in the vision cache."""
        need = [(s, i) for s, start, end in chunks for i, sp in enumerate(s.media)
                if sp.start < end and sp.end > start and s.image_feats[i] is None]
        todo = [(s, i) for s, i in need if not self._from_vision_cache(s, i)]
        if todo:
            self._run_vision(todo)
        out = []
        for s, start, end in chunks:
            parts = [s.image_feats[i][max(start, sp.start) - sp.start:min(end, sp.end) - sp.start]
                     for i, sp in enumerate(s.media) if sp.start < end and sp.end > start]
            out.append(torch.cat(parts) if parts else None)
        return out

    def _from_vision_cache(self, s: Sequence, i: int) -> bool:
        hit = self.vision_cache.get(s.media[i].key) if self.vision_cache is not None else None
        if hit is None:
            return False
        s.image_feats[i] = hit
        s.cached_image_ids.add(i)
        s.metrics.cached_images = len(s.cached_image_ids)
        return True

    def _run_vision(self, todo: list[tuple[Sequence, int]]) -> None:
        self.before_tower([s for s, _ in todo])
        t0 = time.perf_counter()
        pixels, rows = [], []
        for s, i in todo:
            off = sum(s.num_patches[:i])
            pixels.append(s.pixel_values[off:off + s.num_patches[i]])
            rows.append(s.num_patches[i] * self.tokens_per_tile)
        feats = self.runner.vision(torch.cat(pixels))
        if feats.device.type == "cuda":
            torch.cuda.synchronize(feats.device)
        dt = time.perf_counter() - t0
        for (s, i), f in zip(todo, torch.split(feats, rows)):
            s.image_feats[i] = f = f.clone()
            if self.vision_cache is not None:
                self.vision_cache.put(s.media[i].key, f)
        for s in {id(s): s for s, _ in todo}.values():
            s.metrics.vision_s += dt
