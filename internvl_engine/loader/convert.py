"""`internvl-engine convert SRC DST`: rewrite a pickle `.bin` checkpoint (pytorch_model*.bin, as LMDeploy before
v0.9 saved OpenGVLab's AWQ builds) as safetensors, once. The `.bin` files are read with
torch.load(weights_only=True) only; every other file (config, tokenizer, processor) is copied unchanged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CheckpointError
from .files import BinFile, bin_files


def convert_bin_to_safetensors(src: str | Path, dst: str | Path, log=print) -> list[Path]:
    """Writes DST (which must not hold weights yet); returns the safetensors files written, one per `.bin` shard."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory")
    if src.resolve() == dst.resolve():
        raise CheckpointError("convert: SRC and DST must be different directories")
    if list(src.glob("*.safetensors")):
        raise CheckpointError(f"{src}: already holds safetensors weights; nothing to convert")
    files = bin_files(src)
    if dst.exists() and (list(dst.glob("*.safetensors")) or list(dst.glob("*.bin"))):
        raise CheckpointError(f"{dst}: already holds weights; choose an empty directory")
    dst.mkdir(parents=True, exist_ok=True)
    n = len(files)
    weight_map, written = {}, []
    for i, file in enumerate(files):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with BinFile(file) as f:
            # clone: tied or sliced tensors share storage in a pickle, which safetensors refuses
            tensors = {k: f.get_tensor(k).detach().clone().contiguous() for k in f.keys()}
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        written.append(dst / name)
        log(f"{file.name} -> {name} ({len(tensors)} tensors)")
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": sum(p.stat().st_size for p in written)}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".bin" and other.name != "pytorch_model.bin.index.json":
            shutil.copy2(other, dst / other.name)
    return written
