"""safetensors -> model parameters, in the three layouts InternVL checkpoints use (spec section 5):
  -hf files:        vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight
  model.-prefixed:  model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  original:         vision_model.* (fused attn.qkv), mlp1.{0,1,3}.*, language_model.model.*, language_model.lm_head.*
Every key is renamed once to the module names of models/internvl.py; q/k/v and gate/up are written into their
packed matmul's row range. Files are memory-mapped and each tensor is cast and copied straight to the device.
Under tensor parallelism a sharded layer names the slice it holds (layers/linear.py, load_plan) and only that slice
is read (safetensors get_slice), so a rank's host memory holds about 1/N of the language model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

# Prefix renames, first match wins. Original-layout names are mapped to the -hf names here.
_RENAMES = [
    (r"^model\.(vision_tower|multi_modal_projector|language_model)\.", r"\1."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.", r"vision_tower.encoder.layer.\1."),
]
# Inside a vision layer, original -> -hf suffixes.
_ORIGINAL_VISION_LAYER = {"attn.qkv.": "attention.qkv.", "attn.q_norm.": "attention.q_norm.",
                          "attn.k_norm.": "attention.k_norm.", "attn.proj.": "attention.projection_layer.",
                          "norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "ls1": "lambda_1",
                          "ls2": "lambda_2"}
# Separate projections in the checkpoint -> (packed module, shard name).
PACKED = {"attention.q_proj": ("attention.qkv", "q_proj"), "attention.k_proj": ("attention.qkv", "k_proj"),
          "attention.v_proj": ("attention.qkv", "v_proj"),
          "self_attn.q_proj": ("self_attn.qkv_proj", "q_proj"), "self_attn.k_proj": ("self_attn.qkv_proj", "k_proj"),
          "self_attn.v_proj": ("self_attn.qkv_proj", "v_proj"),
          "mlp.gate_proj": ("mlp.gate_up_proj", "gate_proj"), "mlp.up_proj": ("mlp.gate_up_proj", "up_proj")}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def normalize_key(key: str) -> tuple[str, str | None]:
    """Checkpoint key -> (parameter name in our model, shard name inside a packed matmul or None)."""
    name = key
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, name)
        if new != name:
            name = new
            break
    if key.startswith("vision_model.encoder."):
        head, _, tail = name.partition(".encoder.layer.")
        idx, _, rest = tail.partition(".")
        for old, new in _ORIGINAL_VISION_LAYER.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        name = f"{head}.encoder.layer.{idx}.{rest}"
    module, _, leaf = name.rpartition(".")
    for suffix, (packed, shard) in PACKED.items():
        if module.endswith(suffix):
            return f"{module[: -len(suffix)]}{packed}.{leaf}", shard
    return name, None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors weight files, else the pickle `.bin` files (pytorch_model*.bin, read with
    torch.load(weights_only=True): tensors only, never arbitrary objects)."""
    index = path / "model.safetensors.index.json"
    if not index.exists() and not list(path.glob("*.safetensors")):
        return _bin_files(path)
    return _safetensors_files(path, index)


def _indexed_shards(index: Path, kind: str) -> list[Path]:
    """The shard files a weight-map index names, each of which must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid {kind} index ({e})") from None
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
    return files


def _bin_files(path: Path) -> list[Path]:
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        return _indexed_shards(index, "pytorch_model.bin")
    files = sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights (model.safetensors or an index) and no "
                              "pytorch_model*.bin found")
    return files


class _BinFile:
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

    def __getitem__(self, index):
        return self.t[index]


def _safetensors_files(path: Path, index: Path) -> list[Path]:
    if index.exists():
        return _indexed_shards(index, "safetensors")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights (model.safetensors or an index) found")
    return files


def load_model(config, checkpoint: str | Path | None, ops, device: torch.device, dtype: torch.dtype, seed: int = 0,
               tp=None) -> torch.nn.Module:
    """The InternVL model on `device` in `dtype`, in eval mode: this rank's shard (tp; default one rank) of the
    checkpoint's weights, or seeded random weights when checkpoint is None (random:<preset>)."""
    from .models.internvl import InternVLForConditionalGeneration
    with torch.device("meta"):
        net = InternVLForConditionalGeneration(config, ops, tp).to(dtype)
    quant = getattr(config, "quant", None)
    if quant is not None:  # on the meta device still: the dense decoder linears are never allocated
        from .quant import quantize_model
        quantize_model(net, quant, dtype, torch.device("meta"), tp, getattr(net, "ops", None) or ops)
    net.to_empty(device=device)
    if checkpoint is None:
        from .random_model import init_random_
        init_random_(net, seed)
    else:
        load_weights(net, checkpoint, dtype, device)
    return net.eval()


def _plan(model: torch.nn.Module, name: str, shard: str | None, param: torch.Tensor):
    """(part of the parameter to fill, index into the checkpoint tensor or None for all of it, its full shape)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "load_plan"):
        return module.load_plan(leaf, shard)
    return param.data, None, tuple(param.shape)


def _read(f, key: str, index, shape: tuple, file: Path) -> torch.Tensor:
    """The checkpoint tensor `key`, or only its slice `index` (never the whole tensor), checked against `shape`."""
    try:
        if index is None:
            tensor = f.get_tensor(key)
            found = tuple(tensor.shape)
        else:
            part = f.get_slice(key)
            found = tuple(part.get_shape())
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{file.name}: tensor {key!r} cannot be read ({e})") from None
    if found != tuple(shape):
        raise CheckpointError(f"{file.name}: tensor {key!r} has shape {found}, the model expects {tuple(shape)}")
    if index is None:
        return tensor
    try:
        return part[index]
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{file.name}: tensor {key!r} cannot be read ({e})") from None


def load_weights(model: torch.nn.Module, path: str | Path, dtype: torch.dtype, device: torch.device) -> None:
    path = Path(path)
    params = dict(model.named_parameters())
    seen: dict[tuple[str, str | None], str] = {}  # (parameter, shard) -> "file: key" that filled it
    for file in checkpoint_files(path):
        if file.suffix == ".bin":
            handle = _BinFile(file)
        else:
            try:
                handle = safe_open(str(file), framework="pt", device=str(device))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") \
                    from None
        with handle as f:
            for key in f.keys():
                if _IGNORED.search(key):
                    continue
                name, shard = normalize_key(key)
                param = params.get(name)
                if param is None:
                    raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (no parameter {name!r} in the model)")
                if (name, shard) in seen:
                    raise CheckpointError(f"{file.name}: tensor {key!r} fills parameter {name!r}"
                                          f"{f' ({shard})' if shard else ''}, already loaded from {seen[name, shard]}")
                seen[name, shard] = f"{file.name}: {key!r}"
                target, index, shape = _plan(model, name, shard, param)
                tensor = _read(f, key, index, shape, file)
                if tensor.dtype.is_floating_point != target.dtype.is_floating_point or \
                        (tensor.dtype in _FP8) != (target.dtype in _FP8):
                    raise CheckpointError(f"{file.name}: tensor {key!r} is {tensor.dtype}, the model expects "
                                          f"{target.dtype} (a quantized tensor in a dense model, or the reverse?)")
                target.copy_(tensor.to(target.dtype))
    if not any(n == "lm_head.weight" for n, _ in seen):
        model.tie_lm_head()  # tied checkpoints store no lm_head (spec 5.4)
        seen["lm_head.weight", None] = "tied to the embeddings"
    missing = []
    for n in params:
        if (n, None) in seen:
            continue
        module = model.get_submodule(n.rpartition(".")[0])
        names = getattr(module, "shard_names", ())
        shards = [s for s in names if (n, s) not in seen]
        if names and not shards:
            continue
        missing.append(f"{n} ({', '.join(shards)})" if len(shards) < len(names) else n)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: checkpoint is missing tensors for {shown}")


def export_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse mapping: our parameters under the `-hf` file-layout keys, packed matmuls split again.
    An lm_head tied to the embeddings is omitted, as transformers' save_pretrained does."""
    out: dict[str, torch.Tensor] = {}
    tied = model.lm_head.weight is model.language_model.embed_tokens.weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and tied:
            continue
        module, _, leaf = name.rpartition(".")
        pieces = [(name, param.data)]
        for packed in {p for p, _ in PACKED.values()}:
            if module.endswith(packed):
                packed_module = model.get_submodule(module)
                prefix = module[: -len(packed)]
                pieces = []
                for suffix, (p, shard) in PACKED.items():
                    if p == packed:
                        pieces.append((f"{prefix}{suffix}.{leaf}", packed_module.load_plan(leaf, shard)[0]))
        for key, tensor in pieces:
            if key.startswith("language_model."):
                key = "language_model.model." + key[len("language_model."):]
            elif key.startswith("lm_head."):
                key = "language_model." + key
            out[key] = tensor.contiguous()
    return out
