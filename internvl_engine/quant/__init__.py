"""Quantized checkpoints (formats: shared/design/quantization.md).

- AWQ W4A16 as OpenGVLab/LMDeploy ship it (`quant_method: awq, version: gemm, bits: 4, group_size: 128,
  zero_point: true`): only the Qwen2 decoder linears are quantized; per layer `qweight` int32 [in, out/8],
  `qzeros` int32 [in/128, out/8], `scales` [in/128, out], `bias` on q/k/v; w = (q - z) * s.
- FP8 W8A8 in compressed-tensors form (`quant_method: compressed-tensors, format: float-quantized`): `weight`
  float8_e4m3fn [out, in], `weight_scale` [out, 1], activations quantized per token at run time; the `ignore`
  list is honoured.

The config block is read at the top level of config.json, under `llm_config` and under `text_config`
(config.py). Each format is a linear method in its own file (quant/awq.py, quant/fp8.py: parameters, checkpoint
dtypes, shard checks, layout, matmul). The model is built dense on the meta device and its decoder linears are then
swapped for the quantized layers of quant/layers.py (`quantize_model`), which hold such a method and whose
parameters the loader fills from the checkpoint like any other. On the CPU (torch / cpp backends) the quantized layers dequantize and run the matmul.

Under tensor parallelism the quantized layers split as the dense ones do (column-parallel q/k/v and gate/up,
row-parallel o_proj and down_proj; quant/layers.py). AWQ adds two alignments: a rank's output columns fill whole
int32 packs of 8, and a rank's input rows of o_proj / down_proj are whole groups of 128 (their qzeros and scales
hold one row per group). `check_tensor_parallel` refuses other sizes before any worker starts, and names the sizes
that fit."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from ..ops.ref import awq_gemm_ref, fp8_gemm_ref
from .awq import AWQ_ORDER, AWQ_REVERSE, AWQLinearMethod, awq_dequantize, awq_pack, awq_unpack  # noqa: F401
from .fp8 import FP8_MAX, Fp8LinearMethod  # noqa: F401
from .layers import AWQLinear, AWQRowParallelLinear, Fp8Linear, Fp8RowParallelLinear, QuantLinear  # noqa: F401

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class QuantConfig:
    method: str                      # "awq" | "fp8"
    bits: int = 4
    group_size: int = 128
    ignore: list = field(default_factory=list)  # fp8: module names or "re:" patterns left dense

    def ignored(self, names) -> bool:
        for entry in self.ignore:
            for name in names:
                if entry.startswith("re:"):
                    if re.fullmatch(entry[3:], name) or re.match(entry[3:], name):
                        return True
                elif entry == name:
                    return True
        return False


def parse_quant_config(raw: dict | None, where: str) -> QuantConfig | None:
    """A checkpoint's quantization_config -> QuantConfig; UnsupportedModelError for anything not implemented."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{where}: quantization_config must be an object, got {type(raw).__name__}")
    method = str(raw.get("quant_method", "")).lower()
    if method == "awq":
        bits = raw.get("bits", raw.get("w_bit"))
        group = raw.get("group_size", raw.get("q_group_size"))
        version = str(raw.get("version", "gemm")).lower()
        zero = raw.get("zero_point", True)
        if bits != 4:
            raise UnsupportedModelError(f"{where}: AWQ bits {bits!r} is not supported (only 4)")
        if group != 128:
            raise UnsupportedModelError(f"{where}: AWQ group_size {group!r} is not supported (only 128)")
        if version != "gemm":
            raise UnsupportedModelError(f"{where}: AWQ version {version!r} is not supported (only 'gemm')")
        if zero is not True:
            raise UnsupportedModelError(f"{where}: AWQ zero_point {zero!r} is not supported (only true)")
        return QuantConfig("awq", 4, 128)
    if method == "compressed-tensors":
        fmt = raw.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise UnsupportedModelError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                                        "(only 'float-quantized' FP8)")
        groups = _object(raw.get("config_groups"), where, "quantization_config.config_groups")
        if not groups:
            raise UnsupportedModelError(f"{where}: compressed-tensors config has no config_groups")
        for name, g in groups.items():
            key = f"quantization_config.config_groups.{name}"
            g = _object(g, where, key)
            w = _object(g.get("weights"), where, f"{key}.weights")
            a = _object(g.get("input_activations"), where, f"{key}.input_activations")
            ok_w = (w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") == "channel"
                    and w.get("symmetric", True) is True and w.get("dynamic", False) is False)
            ok_a = (a.get("num_bits") == 8 and a.get("type") == "float" and a.get("strategy") == "token"
                    and a.get("dynamic") is True)
            if not (ok_w and ok_a):
                raise UnsupportedModelError(
                    f"{where}: compressed-tensors group {name!r} is not FP8 W8A8 with per-channel weight scales and "
                    "dynamic per-token activations (the only scheme supported)")
            targets = g.get("targets", ["Linear"])
            if not isinstance(targets, list) or targets != ["Linear"] * len(targets):
                raise UnsupportedModelError(f"{where}: compressed-tensors group {name!r} targets "
                                            f"{targets!r}; only ['Linear'] is supported")
        return QuantConfig("fp8", 8, 0, _ignore_list(raw.get("ignore"), where))
    raise UnsupportedModelError(f"{where}: quant_method {raw.get('quant_method')!r} is not supported "
                                "(awq, compressed-tensors)")


def _object(v, where: str, key: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {key} must be a JSON object, got {type(v).__name__} {str(v)[:60]!r}")
    return v


def _ignore_list(v, where: str) -> list[str]:
    """compressed-tensors' `ignore`: module names and "re:" patterns, each checked here (a bad pattern would
    otherwise fail deep inside quantize_model)."""
    key = "quantization_config.ignore"
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise CheckpointError(f"{where}: {key} must be a list of strings, got {type(v).__name__} {str(v)[:60]!r}")
    for entry in v:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise CheckpointError(f"{where}: {key} entry {entry!r} is not a valid regular expression ({e})") \
                    from None
    return list(v)


# ------------------------------------------------------------------------------------------------------ AWQ
awq_matmul_ref = awq_gemm_ref  # the ops contract's oracle (ops/ref.py)


# ------------------------------------------------------------------------------------------------------ FP8
fp8_matmul_ref = fp8_gemm_ref


# ------------------------------------------------------------------------------------------------ the model
def _checkpoint_names(layer: int, sub: str) -> list[str]:
    """The names a decoder linear has in the checkpoint layouts the loader reads (for `ignore` lists)."""
    return [f"language_model.model.layers.{layer}.{sub}", f"model.language_model.layers.{layer}.{sub}",
            f"model.layers.{layer}.{sub}", f"language_model.layers.{layer}.{sub}"]


def tensor_parallel_problem(text, quant: QuantConfig, n: int) -> str | None:
    """Why the quantized decoder linears of a model (`text`, a TextConfig that check_shardable accepts for n) cannot
    be split over n ranks; None when they can. Only AWQ constrains the split: FP8 keeps whole rows (column-parallel)
    or whole columns (row-parallel) of e4m3 values with their per-row scales, which every split of the dense model
    allows. The per-rank sizes are TensorParallel's (distributed/group.py), as the model builds them."""
    if quant is None or quant.method != "awq":
        return None
    from ..parallel import TensorParallel

    split = TensorParallel(0, n)
    h, d, f, g = text.num_attention_heads, text.head_dim, text.intermediate_size, quant.group_size
    kv = text.num_key_value_heads * d
    columns = [("self_attn.q_proj", h * d, split.part(h)[1] * d),
               ("self_attn.k_proj", kv, split.kv_heads(text.num_key_value_heads)[1] * d),
               ("self_attn.v_proj", kv, split.kv_heads(text.num_key_value_heads)[1] * d),
               ("mlp.gate_proj", f, split.part(f)[1]), ("mlp.up_proj", f, split.part(f)[1])]
    for sub, full, per in columns:
        if per % 8:
            return (f"AWQ {sub} (every decoder layer) has {full} output columns, {per} per rank, not a multiple of 8 "
                    "(each rank must keep whole int32 packs of 8 columns)")
    for sub, full in (("self_attn.o_proj", h * d), ("mlp.down_proj", f)):
        per = split.part(full)[1]
        if per % g:
            return (f"AWQ {sub} (every decoder layer) has input size {full}, {per} per rank, not a multiple of the "
                    f"group size {g} (each rank must keep whole groups: qzeros and scales hold one row per {g} "
                    "inputs)")
    return None


def tensor_parallel_sizes(text, quant: QuantConfig | None) -> list[int]:
    """Every tensor_parallel_size the model can use: the dense split works (check_shardable: N divides the
    attention heads, so no larger N is possible) and so does the quantized one."""
    from ..parallel import check_shardable
    from ..errors import ShardingError

    sizes = []
    for n in range(1, text.num_attention_heads + 1):
        try:
            check_shardable(text, n)
        except ShardingError:
            continue
        if tensor_parallel_problem(text, quant, n) is None:
            sizes.append(n)
    return sizes


def check_tensor_parallel(text, quant: QuantConfig | None, n: int) -> None:
    """UnsupportedModelError naming the layer, its size and n when the quantized layers cannot be split over n
    ranks (check_shardable calls this before any worker starts; quantize_model again on every rank)."""
    problem = None if n == 1 else tensor_parallel_problem(text, quant, n)
    if problem is not None:
        fit = ", ".join(map(str, tensor_parallel_sizes(text, quant))) or "none"
        raise UnsupportedModelError(f"tensor_parallel_size {n}: {problem}; tensor_parallel_size that fit this "
                                    f"checkpoint: {fit}")


def _quantized_layer(dense: nn.Module, quant: QuantConfig, dtype, device, ops, where: str) -> QuantLinear:
    """The quantized twin of a dense decoder linear, split over the ranks as it is (layers/linear.py):
    RowParallelLinear -> the row-parallel quantized layer on the same tp; PackedLinear -> its shards and the
    output ranges (`local`) this rank keeps; nn.Linear -> the whole layer."""
    from ..layers.linear import RowParallel

    bias, awq = dense.bias is not None, quant.method == "awq"
    if isinstance(dense, RowParallel):
        if awq:
            return AWQRowParallelLinear(dense.in_features, dense.out_features, bias, dtype, device, dense.tp,
                                        quant.group_size, ops=ops, where=where)
        return Fp8RowParallelLinear(dense.in_features, dense.out_features, bias, dtype, device, dense.tp, ops=ops,
                                    where=where)
    sizes = list(getattr(dense, "full_sizes", [dense.out_features]))
    names, local = getattr(dense, "shard_names", None), getattr(dense, "local", None)
    if awq:
        return AWQLinear(dense.in_features, sizes, names, bias, dtype, device, quant.group_size, ops=ops, local=local,
                         where=where)
    return Fp8Linear(dense.in_features, sizes, names, bias, dtype, device, ops=ops, local=local, where=where)


def quantize_model(model: nn.Module, quant: QuantConfig, dtype: torch.dtype, device, tp=None, ops=None) -> None:
    """Swap the Qwen2 decoder linears of `model` (built dense, this rank's shard when tp.size > 1) for quantized
    layers split the same way, in place."""
    n = getattr(tp, "size", 1)
    text = getattr(getattr(model, "config", None), "text", None)
    if text is not None:
        check_tensor_parallel(text, quant, n)
    layers = model.language_model.layers
    for i, layer in enumerate(layers):
        groups = [(layer.self_attn, "qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                  (layer.self_attn, "o_proj", ["self_attn.o_proj"]),
                  (layer.mlp, "gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"]),
                  (layer.mlp, "down_proj", ["mlp.down_proj"])]
        for parent, attr, subs in groups:
            dense = getattr(parent, attr)
            if quant.method == "fp8":
                flags = [quant.ignored(_checkpoint_names(i, s)) for s in subs]
                if all(flags):
                    continue
                if any(flags):
                    raise UnsupportedModelError(f"layer {i}: the ignore list leaves only some of {subs} dense; "
                                                "they share one matmul here")
            where = f"layer {i} {'/'.join(subs)}" + (f" at tensor_parallel_size {n}" if n > 1 else "")
            setattr(parent, attr, _quantized_layer(dense, quant, dtype, device, ops, where))


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, quantized tensors at their stored size."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
