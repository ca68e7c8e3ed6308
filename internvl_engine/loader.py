"""safetensors -> model parameters, in the three layouts InternVL checkpoints use (spec section 5):
  -hf files:        vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight
  model.-prefixed:  model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  original:         vision_model.* (fused attn.qkv), mlp1.{0,1,3}.*, language_model.model.*, language_model.lm_head.*
Every key is renamed once to the module names of models/internvl.py; q/k/v and gate/up are written into their
packed matmul's row range. Files are memory-mapped and each tensor is cast and copied straight to the device.
Under tensor parallelism a sharded layer names the slice it holds (layers/linear.py, load_plan) and only that slice
is read (safetensors get_slice), so a rank's host memory holds about 1/N of the language model."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .progress import checkpoint_shards

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
    """The shard files a weight-map index names, each of which must exist inside the checkpoint directory."""
    from .config import read_json

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


def load_model(config, checkpoint: str | Path | None, ops, device: torch.device, dtype: torch.dtype, seed: int = 0,
               tp=None) -> torch.nn.Module:
    """The InternVL model on `device` in `dtype`, in eval mode: this rank's shard (tp; default one rank) of the
    checkpoint's weights, or seeded random weights when checkpoint is None (random:<preset>).
    Every tensor the config implies is checked against the checkpoint's headers (names, shapes, dtypes, layer
    counts) while the model is still on the meta device: a config that promises more than the files hold fails
    before anything is allocated."""
    from .models.internvl import InternVLForConditionalGeneration
    catalog = None
    if checkpoint is not None:
        catalog = _catalog(Path(checkpoint))
        _check_layer_counts(config, catalog, Path(checkpoint))
    with torch.device("meta"):
        net = InternVLForConditionalGeneration(config, ops, tp).to(dtype)
    quant = getattr(config, "quant", None)
    if quant is not None:  # on the meta device still: the dense decoder linears are never allocated
        from .quant import quantize_model
        quantize_model(net, quant, dtype, torch.device("meta"), tp, getattr(net, "ops", None) or ops)
    plan = None if catalog is None else _plan_load(net, catalog, Path(checkpoint))
    net.to_empty(device=device)
    if plan is None:
        from .random_model import init_random_
        init_random_(net, seed)
    else:
        _fill(net, plan, device)
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


# safetensors' header dtype names
_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# what a dense (floating) parameter may be stored in; it is cast on the way
DENSE_FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _open(file: Path, device: str = "cpu"):
    if file.suffix == ".bin":
        return _BinFile(file)
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def _catalog(path: Path) -> list[tuple[Path, list[tuple[str, tuple, object]]]]:
    """Per weight file, (key, shape, dtype) of every tensor, from the headers: no tensor data is read."""
    out = []
    for file in checkpoint_files(path):
        entries = []
        with _open(file) as f:
            for key in f.keys():
                if _IGNORED.search(key):
                    continue
                try:
                    part = f.get_slice(key)
                    shape, dtype = tuple(part.get_shape()), part.get_dtype()
                except (SafetensorError, RuntimeError) as e:
                    raise CheckpointError(f"{file.name}: tensor {key!r} cannot be read ({e})") from None
                entries.append((key, shape, _FILE_DTYPES.get(dtype, dtype)))
        out.append((file, entries))
    return out


_LAYER = {"text": re.compile(r"^language_model\.layers\.(\d+)\."),
          "vision": re.compile(r"^vision_tower\.encoder\.layer\.(\d+)\.")}


def _check_layer_counts(config, catalog, path: Path) -> None:
    """The config's layer counts against the layers the checkpoint holds, before the model is built."""
    found = {"text": set(), "vision": set()}
    for _, entries in catalog:
        for key, _, _ in entries:
            name = normalize_key(key)[0]
            for tower, pattern in _LAYER.items():
                m = pattern.match(name)
                if m:
                    found[tower].add(int(m.group(1)))
    text_key = "llm_config" if getattr(config, "source_format", "hf") == "original" else "text_config"
    where = getattr(config, "source", "") or "config.json"
    for tower, sub, key in (("text", config.text, f"{text_key}.num_hidden_layers"),
                            ("vision", config.vision, "vision_config.num_hidden_layers")):
        held = max(found[tower]) + 1 if found[tower] else 0
        if held != sub.num_hidden_layers:
            what = "decoder" if tower == "text" else "vision"
            raise CheckpointError(f"{where}: {key} is {sub.num_hidden_layers}, but the checkpoint {path} holds "
                                  f"tensors of {held} {what} layers")


def _expected_dtypes(model: torch.nn.Module, name: str, target: torch.Tensor) -> tuple[tuple, str]:
    """(the dtypes a checkpoint may store parameter `name` in, what it is): a quantized layer's own table, exact
    (quant/layers.py); any float for a dense parameter, cast on the way."""
    owner, _, leaf = name.rpartition(".")
    table = getattr(model.get_submodule(owner), "CHECKPOINT_DTYPES", None)
    if table is not None:
        return table[leaf]
    if target.dtype.is_floating_point and target.dtype not in _FP8:
        return DENSE_FILE_DTYPES, "a dense parameter"
    return (target.dtype,), "this parameter"


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _plan_load(model: torch.nn.Module, catalog, path: Path):
    """Checks the whole checkpoint against the (meta) model: every tensor has a parameter, fills it once, has its
    shape and an accepted dtype, and no parameter is left without one. Returns what _fill reads, per file, and
    whether the lm_head is tied to the embeddings."""
    params = dict(model.named_parameters())
    seen: dict[tuple[str, str | None], str] = {}  # (parameter, shard) -> "file: key" that fills it
    plan = []
    for file, entries in catalog:
        reads = []
        for key, found, dtype in entries:
            name, shard = normalize_key(key)
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (no parameter {name!r} in the model)")
            if (name, shard) in seen:
                raise CheckpointError(f"{file.name}: tensor {key!r} fills parameter {name!r}"
                                      f"{f' ({shard})' if shard else ''}, already loaded from {seen[name, shard]}")
            seen[name, shard] = f"{file.name}: {key!r}"
            target, _, shape = _plan(model, name, shard, param)
            if found != tuple(shape):
                raise CheckpointError(f"{file.name}: tensor {key!r} has shape {found}, the model expects "
                                      f"{tuple(shape)}")
            allowed, what = _expected_dtypes(model, name, target)
            if dtype not in allowed:
                raise CheckpointError(f"{file.name}: tensor {key!r} is {str(dtype).removeprefix('torch.')}, the "
                                      f"model expects {_dtype_names(allowed)} ({what})")
            reads.append((key, name, shard))
        plan.append((file, reads))
    tie = not any(n == "lm_head.weight" for n, _ in seen)
    if tie:
        config = getattr(model, "config", None)
        if config is not None and not config.lm_head_may_tie:
            raise CheckpointError(f"{path}: checkpoint is missing tensor lm_head.weight (language_model.lm_head."
                                  f"weight), and {config.source or 'config.json'} says tie_word_embeddings false, so "
                                  "it is not tied to the embeddings")
        seen["lm_head.weight", None] = "tied to the embeddings"  # tied checkpoints store no lm_head (spec 5.4)
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
    return plan, tie


def _fill(model: torch.nn.Module, plan, device: torch.device) -> None:
    files, tie = plan
    params = dict(model.named_parameters())
    with checkpoint_shards([file for file, _ in files]) as shard_done:  # a bar on a terminal, a log line per shard
        for file, reads in files:
            with _open(file, str(device)) as f:
                for key, name, shard in reads:
                    target, index, shape = _plan(model, name, shard, params[name])
                    target.copy_(_read(f, key, index, shape, file).to(target.dtype))
            shard_done(file)
    if tie:
        model.tie_lm_head()


def load_weights(model: torch.nn.Module, path: str | Path, dtype: torch.dtype, device: torch.device) -> None:
    """Fills an allocated model from the checkpoint at `path` (load_model checks before allocating)."""
    path = Path(path)
    _fill(model, _plan_load(model, _catalog(path), path), device)


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
