"""The quantization block of config.json (top level, `llm_config` or `text_config`: model.py finds it) as plain
data: which format, its parameters, and which modules stay dense. quant/ turns it into the linear methods the
layers hold (formats: quant/__init__.py).

- AWQ (`quant_method: awq`): only version gemm, 4 bits, group size 128, zero point (LMDeploy's and AutoAWQ's
  shipping form).
- FP8 (`quant_method: compressed-tensors`, format float-quantized): FP8 W8A8, per-channel weight scales, dynamic
  per-token activations; `ignore` names modules (or "re:" patterns) left dense."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CheckpointError, UnsupportedModelError

# where the checkpoint layouts the loader reads put the decoder (the engine's own names: language_model.layers.N)
_DECODER_PREFIXES = ("language_model.model.", "model.language_model.", "model.", "language_model.")


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

    def keeps_dense(self, name: str) -> bool:
        """Whether the ignore list leaves the module the engine calls `name` (e.g. language_model.layers.3.mlp.
        down_proj) dense, under any of the names the checkpoint layouts give it."""
        tail = name[len("language_model."):] if name.startswith("language_model.") else None
        return self.ignored([name] if tail is None else [p + tail for p in _DECODER_PREFIXES])


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
    otherwise fail deep inside the model's build)."""
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
