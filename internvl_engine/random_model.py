"""Seeded random-weight InternVL3 models with real shapes (`random:<preset>`), for benchmarks, the demo and tests.

Initialisation follows the spec's advice (section 10) so that logits do not tie: linears N(0, 1/fan_in), norm
weights near 1, layer scale near 0.5, non-zero biases, CLS and positions, embeddings N(0, 0.01). A tensor-parallel
rank draws each sharded parameter whole, in the same order, and keeps its slice: every N gives the same model.

The internvl3-14b/38b/78b presets (spec 1.4: InternViT-300M + Qwen2.5-14B, InternViT-6B + Qwen2.5-32B and
Qwen2.5-72B) are for floors and benchmarks, sharded with tensor_parallel_size; far too big to build in tests.

Every preset has quantized variants, `<preset>-awq` (W4A16, the block OpenGVLab's AWQ builds carry) and `<preset>-fp8`
(compressed-tensors FP8 W8A8): the decoder linears are drawn exactly as the dense preset draws them (same seed,
same order) and quantized on the spot (quant/writer.py), so `random:X-awq` is the AWQ quantization of `random:X`.
AWQ needs every quantized input size to be a multiple of 128: `small` is the least preset that has that."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from .constants import DOWNSAMPLE_RATIO, IMAGE_SEQ_LENGTH, IMAGE_TOKEN_ID, PATCH_SIZE, TILE_SIZE

_VISION_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    attention_bias=True, use_qk_norm=False, norm_type="layer_norm")
_VISION_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                  attention_bias=False, use_qk_norm=True, norm_type="rms_norm")


def _text(hidden, layers, heads, kv, inter, tie=False):
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151674, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_theta=1000000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                tie_word_embeddings=tie, bos_token_id=151643, eos_token_id=151645, hidden_act="silu")


PRESETS = {
    "tiny": dict(vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
                 text=_text(64, 2, 4, 2, 128)),
    "small": dict(vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
                  text=_text(128, 2, 4, 2, 256)),
    "internvl3-1b": dict(vision=_VISION_300M, text=_text(896, 24, 14, 2, 4864)),
    "internvl3-2b": dict(vision=_VISION_300M, text=_text(1536, 28, 12, 2, 8960)),
    "internvl3-8b": dict(vision=_VISION_300M, text=_text(3584, 28, 28, 4, 18944)),
    "internvl3-14b": dict(vision=_VISION_300M, text=_text(5120, 48, 40, 8, 13824)),
    "internvl3-38b": dict(vision=_VISION_6B, text=_text(5120, 64, 40, 8, 27648)),
    "internvl3-78b": dict(vision=_VISION_6B, text=_text(8192, 80, 64, 8, 29568)),
}


# quantization_config blocks, at the top level as transformers writes them (the loader also reads llm_config's)
QUANT_BLOCKS = {
    "awq": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True},
    "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}},
            "ignore": ["re:.*lm_head", "re:.*vision_model.*", "re:.*mlp1.*"]},
}


def split_preset(name: str) -> tuple[str, str | None]:
    """"internvl3-8b-awq" -> ("internvl3-8b", "awq"); a dense preset -> (name, None)."""
    base, _, suffix = name.rpartition("-")
    return (base, suffix) if suffix in QUANT_BLOCKS and base in PRESETS else (name, None)


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(f"{p}-{q}" for p in PRESETS for q in QUANT_BLOCKS)


def preset_config(name: str) -> dict:
    """config.json contents (the transformers `-hf` form) of a preset."""
    from .errors import UnsupportedModelError
    base, quant = split_preset(name)
    if base not in PRESETS:
        raise UnsupportedModelError(f"unknown random preset {name!r}; choose one of {sorted(PRESETS)}, each also "
                                    f"as <preset>-awq or <preset>-fp8")
    p = copy.deepcopy(PRESETS[base])
    vision = dict(model_type="internvl_vision", hidden_act="gelu", layer_norm_eps=1e-6, image_size=[TILE_SIZE] * 2,
                  patch_size=[PATCH_SIZE] * 2, use_mean_pooling=True, **p["vision"])
    return dict(model_type="internvl", architectures=["InternVLForConditionalGeneration"], vision_config=vision,
                text_config=p["text"], image_token_id=IMAGE_TOKEN_ID, image_seq_length=IMAGE_SEQ_LENGTH,
                downsample_ratio=DOWNSAMPLE_RATIO,
                projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                tie_word_embeddings=p["text"]["tie_word_embeddings"], dtype="bfloat16",
                **({"quantization_config": copy.deepcopy(QUANT_BLOCKS[quant])} if quant else {}))


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
        else:  # linear and conv weights
            fan_in = math.prod(shape[1:])
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
    from .quant.writer import quantize_dense

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
    from safetensors.torch import save_file

    from .config import ModelConfig
    from .models.internvl import InternVLForConditionalGeneration
    from .loader import export_hf_state_dict
    from .processor.files import write_processor_files

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = preset_config(preset)
    config = ModelConfig.from_dict(raw)
    model = InternVLForConditionalGeneration(config)
    if config.quant is not None:
        from .quant import quantize_model
        quantize_model(model, config.quant, torch.float32, torch.device("cpu"))
    init_random_(model, seed)
    state = {k: v.to(FILE_DTYPES.get(k.rpartition(".")[2], v.dtype)) for k, v in export_hf_state_dict(model).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    write_processor_files(path)
    return path
