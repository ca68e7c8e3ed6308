"""Checkpoint files -> model parameters. Every key is renamed once (names.py); q/k/v and gate/up are written into
their packed matmul's row range (InternLM2's wqkv, grouped by KV head, reordered into all three). Files are
memory-mapped and each tensor is cast and copied straight to the device.
Under tensor parallelism a sharded layer names the slice it holds (layers/linear.py, load_plan) and only that slice
is read (safetensors get_slice), so a rank's host memory holds about 1/N of the language model."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import CheckpointError
from ..layers.linear import QKV_GROUPED
from ..models.internvl import InternVLForConditionalGeneration
from ..progress import checkpoint_shards
from .files import checkpoint_files, open_weights
from .names import normalize_key
from .random_init import init_random_

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def load_model(config, checkpoint: str | Path | None, ops, device: torch.device, dtype: torch.dtype, seed: int = 0,
               tp=None) -> torch.nn.Module:
    """The InternVL model on `device` in `dtype`, in eval mode: this rank's shard (tp; default one rank) of the
    checkpoint's weights, or seeded random weights when checkpoint is None (random:<preset>).
    Every tensor the config implies is checked against the checkpoint's headers (names, shapes, dtypes, layer
    counts) while the model is still on the meta device: a config that promises more than the files hold fails
    before anything is allocated."""
    catalog = None
    if checkpoint is not None:
        catalog = _catalog(Path(checkpoint))
        _check_layer_counts(config, catalog, Path(checkpoint))
    with torch.device("meta"):  # each linear holds the method of its format (quantized tensors keep their dtypes)
        net = InternVLForConditionalGeneration(config, ops, tp).to(dtype)
    plan = None if catalog is None else _plan_load(net, catalog, Path(checkpoint))
    net.to_empty(device=device)
    if plan is None:
        init_random_(net, seed)
        if config.ties_lm_head:  # a tied preset's head is its embedding, as transformers builds it
            net.tie_lm_head()
    else:
        _fill(net, plan, device)
    return net.eval()


def _plan(model: torch.nn.Module, name: str, shard: str | None, param: torch.Tensor):
    """(part of the parameter to fill, index into the checkpoint tensor or None for all of it, its full shape, what
    reorders the tensor read into that part or None). q/k/v grouped by KV head (InternLM2's wqkv) reorders, and a
    3-D experts tensor read by a tensor-parallel rank (its gate rows and up rows of every expert)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if shard == QKV_GROUPED:  # names.py gives it to q/k/v projections (QKVParallelLinear) only
        return module.grouped_load_plan(leaf)
    if hasattr(module, "load_plan"):
        return module.load_plan(leaf, shard)
    return param.data, None, tuple(param.shape), None


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
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# what a dense (floating) parameter may be stored in; it is cast on the way
DENSE_FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _catalog(path: Path) -> list[tuple[Path, list[tuple[str, tuple, object]]]]:
    """Per weight file, (key, shape, dtype) of every tensor, from the headers: no tensor data is read."""
    out = []
    for file in checkpoint_files(path):
        entries = []
        with open_weights(file) as f:
            for key in f.keys():
                if _IGNORED.search(key):
                    continue
                try:
                    part = f.get_slice(key)
                    shape, dtype = tuple(part.get_shape()), part.get_dtype()
                except (SafetensorError, RuntimeError) as e:
                    raise CheckpointError(f"{file.name}: tensor {key!r} cannot be read ({e})") from None
                entries.append((key, shape, _HEADER_DTYPES.get(dtype, dtype)))
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
    """(the dtypes a checkpoint may store parameter `name` in, what it is): a quantized layer's method's own table,
    exact (quant/awq.py, quant/fp8.py); any float for a dense parameter, cast on the way."""
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
            owner = model.get_submodule(name.rpartition(".")[0])
            parts = getattr(owner, "shard_names", ())
            if shard not in (None, QKV_GROUPED) and shard not in parts:  # e.g. an expert past the config's count
                raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (parameter {name!r} has no part "
                                      f"{shard!r}; its parts: {_parts(parts)})")
            # InternLM2's wqkv fills q, k and v at once, and a whole packed tensor (a layer's 3-D experts) every part:
            # a key for one of them beside it fills that part twice
            fills = parts if shard == QKV_GROUPED or (shard is None and parts) else [shard]
            for part in fills:
                if (name, part) in seen:
                    raise CheckpointError(f"{file.name}: tensor {key!r} fills parameter {name!r}"
                                          f"{f' ({part})' if part else ''}, already loaded from {seen[name, part]}")
                seen[name, part] = f"{file.name}: {key!r}"
            target, _, shape, _ = _plan(model, name, shard, param)
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


def _parts(names) -> str:
    return ", ".join(names[:4]) + (f" ... {names[-1]} ({len(names)})" if len(names) > 4 else "")


def _fill(model: torch.nn.Module, plan, device: torch.device) -> None:
    files, tie = plan
    params = dict(model.named_parameters())
    with checkpoint_shards([file for file, _ in files]) as shard_done:  # a bar on a terminal, a log line per shard
        for file, reads in files:
            with open_weights(file, str(device)) as f:
                for key, name, shard in reads:
                    target, index, shape, regroup = _plan(model, name, shard, params[name])
                    tensor = _read(f, key, index, shape, file)
                    target.copy_((tensor if regroup is None else regroup(tensor)).to(target.dtype))
            shard_done(file)
    if tie:
        model.tie_lm_head()
