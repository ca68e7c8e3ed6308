"""Seeded random weights for `random:<preset>` models (config/presets.py) and the checkpoints written from them
(benchmarks, the demo, tests).

Initialisation follows the spec's advice (section 10) so that logits do not tie: linears N(0, 1/fan_in), norm
weights near 1, layer scale near 0.5, non-zero biases, CLS and positions, embeddings N(0, 0.01). A tensor-parallel
rank draws each sharded parameter whole, in the same order, and keeps its slice: every N gives the same model.

A quantized preset's decoder linears (`<preset>-awq`, `<preset>-fp8`) are drawn exactly as the dense preset draws
them (same seed, same order) and quantized on the spot (quant/writer.py), so `random:X-awq` is the AWQ quantization
of `random:X`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig, preset_config
from ..models.internvl import InternVLForConditionalGeneration
from ..processor.files import write_processor_files
from ..processor.tokenizer import builtin_tokenizer_json
from ..quant.writer import quantize_dense
from .names import export_hf_state_dict


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device)

    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        method = _quant_method(module)
        if method is not None and leaf != "bias":
            if leaf == QUANT_FIRST_LEAF[method]:  # where the dense layer draws its weight
                _init_quantized_(module, method, randn)
            continue
        shape = module.full_shape(leaf) if hasattr(module, "full_shape") else tuple(p.shape)  # sharded: the whole
        if "norm" in name and leaf == "weight":
            values = 1.0 + 0.1 * randn(shape)
        elif leaf in ("lambda_1", "lambda_2"):
            values = 0.5 + 0.1 * randn(shape)
        elif leaf == "bias" or leaf in ("cls_token", "position_embeddings"):
            values = 0.02 * randn(shape)
        elif "embed_tokens" in name:
            values = 0.01 * randn(shape)
        else:  # linear and conv weights; a MoE layer's 3-D experts tensors are [expert, out, in]
            fan_in = shape[-1] if ".experts." in name else math.prod(shape[1:])
            values = randn(shape) * fan_in ** -0.5
        if hasattr(module, "from_full"):
            values = module.from_full(leaf, values)
        p.copy_(values.to(p.dtype))


# the dtypes the producers store these leaves in (AWQ scales: fp16; FP8 weight_scale: the model dtype, bf16)
FILE_DTYPES = {"scales": torch.float16, "weight_scale": torch.bfloat16}
QUANT_FIRST_LEAF = {"awq": "qweight", "fp8": "weight"}


def _quant_method(module) -> str | None:
    """The format of a quantized layer's linear method (quant/awq.py, quant/fp8.py); None for a dense one."""
    method = getattr(module, "quant_method", None)
    return None if method is None else method.name


def _init_quantized_(module, method: str, randn) -> None:
    """Draw the dense weight [out, in] whole, as the dense layer would, quantize it, keep this rank's part."""
    first = QUANT_FIRST_LEAF[method]
    full = module.full_shape(first) if hasattr(module, "full_shape") else tuple(getattr(module, first).shape)
    out, inp = (full[1] * 8, full[0]) if method == "awq" else full
    for leaf, values in quantize_dense(method, randn((out, inp)) * inp ** -0.5).items():
        if hasattr(module, "from_full"):
            values = module.from_full(leaf, values)
        param = getattr(module, leaf)
        param.copy_(values.to(param.dtype))


def write_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a complete `-hf` checkpoint directory (config, safetensors, tokenizer, chat template, processor configs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = preset_config(preset)
    config = ModelConfig.from_dict(raw, f"random:{preset}")
    tokenizer = builtin_tokenizer_json(config)  # the one the preset runs with; refused before building the model
    model = InternVLForConditionalGeneration(config)
    init_random_(model, seed)
    state = {k: v.to(FILE_DTYPES.get(k.rpartition(".")[2], v.dtype)) for k, v in export_hf_state_dict(model).items()}
    if config.ties_lm_head:  # as transformers saves a tied model: no lm_head, the loader ties it to the embeddings
        state.pop("language_model.lm_head.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    write_processor_files(path, tokenizer_json=tokenizer)
    return path
