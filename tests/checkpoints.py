"""Random-weight InternVL checkpoints written by transformers itself (the reference), for the parity tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from internvl_engine.processor.files import write_processor_files
from internvl_engine.loader import init_random_  # the spec's non-degenerate init, by parameter name

# Tiny configs in the two vision-tower styles of the spec (section 1.4).
_VISION_300M = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    attention_bias=True, use_qk_norm=False, norm_type="layer_norm")
_VISION_6B = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, intermediate_size=320,
                  attention_bias=False, use_qk_norm=True, norm_type="rms_norm")
VARIANTS = {
    "300m": dict(
        vision=_VISION_300M,
        text=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=160, tie_word_embeddings=False),
    ),
    "6b": dict(
        vision=_VISION_6B,
        text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=192, tie_word_embeddings=True),
    ),
    # Llama decoders (InternVL3-9B's InternLM3 and InternVL2.5's InternLM2.5 as transformers' converter writes them):
    # GQA, no biases, a head_dim other than hidden_size / heads (24, not a power of two: the kernels' masked tails).
    "llama-300m": dict(
        vision=_VISION_300M,
        text=dict(model_type="llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=24, intermediate_size=160, tie_word_embeddings=False),
    ),
    "llama-6b": dict(
        vision=_VISION_6B,
        text=dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=192, tie_word_embeddings=False),
    ),
    # Llama's optional biases (attention_bias: q/k/v/o; mlp_bias: gate/up/down), which no InternVL release sets
    "llama-biases-300m": dict(
        vision=_VISION_300M,
        text=dict(model_type="llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=24, intermediate_size=160, tie_word_embeddings=False,
                  attention_bias=True, mlp_bias=True),
    ),
    # Qwen3 decoders (InternVL3.5 dense): q_norm / k_norm, no biases, head_dim above hidden_size / heads as in 3.5
    # (128 where hidden / heads is 64), plain RoPE with base 1e6; untied with one tower, tied with the other.
    "qwen3-300m": dict(
        vision=_VISION_300M,
        text=dict(model_type="qwen3", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, intermediate_size=160, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen3-6b": dict(
        vision=_VISION_6B,
        text=dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=192, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    # Qwen3-MoE decoders (InternVL3.5-30B-A3B / 241B-A28B): Qwen3 attention, routed SwiGLU experts. 6 experts (not a
    # power of two), top 2 renormalised, expert width 48, layer 1 dense (mlp_only_layers, intermediate_size 160);
    # then top 1 of 5 without renormalising (the weight is the softmax probability itself), decoder_sparse_step 2
    # (layers 1 and 3 sparse, 0 and 2 dense), tied embeddings.
    "qwen3moe-300m": dict(
        vision=_VISION_300M,
        text=dict(model_type="qwen3_moe", hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, intermediate_size=160, moe_intermediate_size=48,
                  num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                  decoder_sparse_step=1, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen3moe-k1-300m": dict(
        vision=_VISION_300M,
        text=dict(model_type="qwen3_moe", hidden_size=96, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, intermediate_size=160, moe_intermediate_size=40,
                  num_experts=5, num_experts_per_tok=1, norm_topk_prob=False, mlp_only_layers=[],
                  decoder_sparse_step=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "internvl3-1b": dict(
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
        text=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, tie_word_embeddings=False),
    ),
}


def hf_config(variant: str, max_position_embeddings: int = 32768, image_size: int = 448):
    from transformers import InternVLConfig

    v = VARIANTS[variant]
    text = dict(model_type="qwen2", vocab_size=151674, rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
                rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0},
                bos_token_id=151643, eos_token_id=151645) | v["text"]  # a variant's own keys win
    vision = dict(layer_norm_eps=1e-6, image_size=image_size, patch_size=14, hidden_act="gelu", **v["vision"])
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667,
                          tie_word_embeddings=v["text"]["tie_word_embeddings"])


def build_hf_checkpoint(path: Path, variant: str = "300m", seed: int = 0, image_size: int = 448, **config_kw):
    """Writes an `-hf` checkpoint with transformers' save_pretrained plus the processor files; returns the model.
    image_size is the vision tower's tile side; the processor files follow it (tile side, and image_seq_length =
    (image_size / 14 / 2)^2 tokens a tile: patch 14, pixel shuffle 0.5)."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_config(variant, image_size=image_size, **config_kw)).eval()
    init_random_(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_processor_files(path, tile_size=image_size, image_seq_length=(image_size // 14 // 2) ** 2)
    return model


def build_hf_checkpoint_with_hf_processor(path: Path, variant: str = "300m", image_size: int = 448, seed: int = 0,
                                          **processor_kw):
    """An `-hf` checkpoint whose model AND processor files transformers wrote (save_pretrained for both: the
    processor settings nested in processor_config.json, as transformers 5 saves them). The processor's tile side
    and image_seq_length follow the model's image_size; processor_kw as hf_processor.save_hf_processor.
    Returns (model, the transformers processor)."""
    from transformers import InternVLForConditionalGeneration

    from hf_processor import save_hf_processor

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_config(variant, image_size=image_size)).eval()
    init_random_(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokens_per_tile = (image_size // 14 // 2) ** 2  # patch 14, pixel shuffle 0.5
    processor = save_hf_processor(path, tile_size=image_size, image_seq_length=tokens_per_tile, **processor_kw)
    return model, processor


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())
