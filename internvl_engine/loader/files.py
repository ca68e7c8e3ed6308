"""A checkpoint's weight files: safetensors (model.safetensors or shards named by model.safetensors.index.json),
else pickle `.bin` files (pytorch_model*.bin, read with torch.load(weights_only=True): tensors only, never
arbitrary objects) behind the part of safetensors' safe_open interface the loader uses."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import read_json
from ..errors import CheckpointError


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors weight files, else the pickle `.bin` files."""
    index = path / "model.safetensors.index.json"
    if not index.exists() and not list(path.glob("*.safetensors")):
        return bin_files(path)
    return _safetensors_files(path, index)


def _indexed_shards(index: Path, kind: str) -> list[Path]:
    """The shard files a weight-map index names, each of which must exist inside the checkpoint directory."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: not a valid {kind} index (weight_map must map tensor names to shard file "
                              f"names, got {type(weight_map).__name__})")
    names = sorted(set(weight_map.values()))
    for name in names:
        # a name, never a path out of the directory: checked as written (the files themselves may be symlinks,
        # as in the Hugging Face cache)
        parts = Path(name).parts
        if not name or "\0" in name or Path(name).is_absolute() or ".." in parts:
            key = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(f"{index}: weight_map entry {key!r} names shard {name!r}, which is not a file "
                                  "name inside the checkpoint directory")
    files = [index.parent / name for name in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
    return files


def bin_files(path: Path) -> list[Path]:
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        return _indexed_shards(index, "pytorch_model.bin")
    files = sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights (model.safetensors or an index) and no "
                              "pytorch_model*.bin found")
    return files


class BinFile:
    """A `.bin` state dict behind the part of safe_open's interface the loader uses."""

    def __init__(self, file: Path):
        try:
            try:
                sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError for anything that is not plain tensors
            raise CheckpointError(f"{file}: cannot read as a tensors-only PyTorch state dict ({type(e).__name__}: "
                                  f"{e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{file}: not a state dict of tensors")
        self.sd = sd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sd = None

    def keys(self):
        return list(self.sd)

    def get_tensor(self, key):
        return self.sd[key]

    def get_slice(self, key):
        return _BinSlice(self.sd[key])


class _BinSlice:
    def __init__(self, t):
        self.t = t

    def get_shape(self):
        return list(self.t.shape)

    def get_dtype(self):
        return self.t.dtype

    def __getitem__(self, index):
        return self.t[index]


def _safetensors_files(path: Path, index: Path) -> list[Path]:
    if index.exists():
        return _indexed_shards(index, "safetensors")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights (model.safetensors or an index) found")
    return files


def open_weights(file: Path, device: str = "cpu"):
    if file.suffix == ".bin":
        return BinFile(file)
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
