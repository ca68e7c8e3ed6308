"""The config.json of each `random:<preset>` model: InternVL3's real shapes, for benchmarks, the demo and tests
(the loader draws their seeded weights: loader/random_init.py).

The internvl3-14b/38b/78b presets (spec 1.4: InternViT-300M + Qwen2.5-14B, InternViT-6B + Qwen2.5-32B and
Qwen2.5-72B) are for floors and benchmarks, sharded with tensor_parallel_size; far too big to build in tests.

Every preset has quantized variants, `<preset>-awq` (W4A16, the block OpenGVLab's AWQ builds carry) and `<preset>-fp8`
(compressed-tensors FP8 W8A8): the same config.json plus its quantization_config block.
AWQ needs every quantized input size to be a multiple of 128: `small` is the least preset that has that."""
from __future__ import annotations

import copy

from ..constants import DOWNSAMPLE_RATIO, IMAGE_SEQ_LENGTH, IMAGE_TOKEN_ID, PATCH_SIZE, TILE_SIZE
from ..errors import UnsupportedModelError

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
