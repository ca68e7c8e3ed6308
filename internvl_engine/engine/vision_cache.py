"""LRU cache of projector outputs (an image's rows of image features), keyed by block_manager.media_key(), so a
repeated image skips the vision tower. Bounded by the bytes of the stored tensors (on whatever device they live).

Not thread-safe: the engine loop owns it and is its only caller."""
from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # first = least recently used
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:  # no effect on order or counters
        return key in self._entries

    def get(self, key: bytes) -> torch.Tensor | None:
        t = self._entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return t

    def put(self, key: bytes, tensor: torch.Tensor) -> None:
        """Store tensor under key (replacing any old entry) and evict least recently used entries until the total
        fits max_bytes. A tensor larger than max_bytes is not stored, and evicts nothing."""
        t = tensor.detach()
        # a view (e.g. one image's rows of a batched projector output) would pin its whole base tensor while only
        # its own bytes are counted, so keep a compact copy instead
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        self._pop(key)
        while self.nbytes + size > self.max_bytes:
            self._pop(next(iter(self._entries)))
        self._entries[key] = t
        self.nbytes += size

    def _pop(self, key: bytes) -> None:
        t = self._entries.pop(key, None)
        if t is not None:
            self.nbytes -= t.numel() * t.element_size()
