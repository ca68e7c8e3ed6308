"""The config.json of each `random:<preset>` model: the real shapes of the InternVL releases, for benchmarks, the
demo and tests (the loader draws their seeded weights: loader/random_init.py). Each text config is what transformers
writes for that release's `-hf` form (model_type qwen2 / llama / qwen3 and their keys).

Where each shape comes from (vision towers: InternViT-300M-448px-V2_5 is 24 x 1024, InternViT-6B-448px-V2_5 as
InternVL uses it 45 x 3200, spec 1.4):
- internvl3-1b .. -78b: spec 1.4 (InternViT-300M + Qwen2.5-0.5B/1.5B/7B/14B; InternViT-6B + Qwen2.5-32B/72B).
- internvl3-9b: InternViT-300M + InternLM3-8B (OpenGVLab/InternVL README model zoo). transformers'
  convert_internvl_weights_to_hf.py (huggingface/transformers, src/transformers/models/internvl/) writes its
  llm_config as a LlamaConfig with image_token_id 92546 and `<|im_end|>` 92542 as eos in generation_config.json
  (the text config keeps eos 2, bos 1); the LM shape is internlm/internlm3-8b-instruct's config.json (vocab 128512,
  4096 x 48 layers, 32 heads / 2 KV heads, head_dim 128, intermediate 10240, rms_norm_eps 1e-5, rope_theta 5e7,
  dynamic NTK factor 6.0 over 32768 positions, untied), as third-party ports quote it verbatim.
- internvl3_5-1b/2b/4b/8b/14b: InternViT-300M + Qwen3-0.6B/1.7B/4B/8B/14B; internvl3_5-38b: InternViT-6B +
  Qwen3-32B (OpenGVLab InternVL3.5 model cards and blog, internvl.github.io/blog/2025-08-26-InternVL-3.5). The
  Qwen3 shapes are the Qwen/Qwen3-* config.json files (Qwen3 technical report, table 1: layers, heads, tying):
  head_dim 128 throughout, vocab 151936, rope_theta 1e6, 40960 positions, tied embeddings up to 4B. The -HF
  configs' image_token_id is 151671: Qwen3's added tokens end at </think> 151668, so InternVL's <img> </img>
  <IMG_CONTEXT> follow at 151669..151671.
- internvl3_5-30b-a3b: InternViT-300M + Qwen3-30B-A3B; internvl3_5-241b-a28b (also spelled -241b-a22b, after its
  language model): InternViT-6B + Qwen3-235B-A22B (the InternVL3.5 model cards' table: 0.3B + 30.5B = 30.8B and
  5.5B + 235.1B = 240.7B parameters; arXiv 2508.18265). The Qwen3-MoE shapes are the Qwen/Qwen3-30B-A3B and
  Qwen3-235B-A22B config.json files as third-party ports restate them (Ascend MindSpeed-RL
  configs/model/qwen3_30b_a3b.yaml and qwen3_235b_a22b.yaml, slime's scripts/models/qwen3-*.sh): 48 x 2048
  and 94 x 4096, 32 / 4 and 64 / 4 heads of 128, 128 experts of width 768 and 1536, 8 routed per token with
  normalised weights, every layer sparse, no shared expert, untied, vocabulary 151936, 40960 positions, rope_theta
  1e6; intermediate_size (6144, 12288: slime's --ffn-hidden-size) is the dense MLP width no layer of theirs
  uses. Model cards: 30.5B total / 3.3B activated and 235B / 22B, which tests/test_bench.py checks against
  bench/floors.py's counts. Quantized experts are not built: their -awq / -fp8 names are refused.
- tiny / small and their llama / qwen3 / qwen3-moe twins: test shapes on the InternVL3 tokenizer's ids (vocabulary
  151674, <IMG_CONTEXT> 151667, the tokenizer a preset runs with). The llama and qwen3 ones state a head_dim other
  than hidden / heads, as InternLM3 and Qwen3 do; the qwen3-moe ones have 6 and 8 experts, 2 routed per token.

The internvl3-14b/38b/78b, internvl3_5-14b/38b/30b-a3b/241b-a28b presets are for floors and benchmarks, sharded
with tensor_parallel_size; far too big to build in tests.

Every dense preset has quantized variants, `<preset>-awq` (W4A16, the block OpenGVLab's AWQ builds carry) and
`<preset>-fp8` (compressed-tensors FP8 W8A8): the same config.json plus its quantization_config block.
AWQ needs every quantized input size (hidden, heads x head_dim, intermediate) to be a multiple of 128: `small`,
`small-llama` and `small-qwen3` are the least presets that have that."""
from __future__ import annotations

import copy

from ..constants import DOWNSAMPLE_RATIO, IMAGE_SEQ_LENGTH, IMAGE_TOKEN_ID, PATCH_SIZE, TILE_SIZE
from ..errors import UnsupportedModelError

_VISION_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    attention_bias=True, use_qk_norm=False, norm_type="layer_norm")
_VISION_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                  attention_bias=False, use_qk_norm=True, norm_type="rms_norm")
_VISION_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    attention_bias=True, use_qk_norm=False, norm_type="layer_norm")
_INTERNVL3_TOKENS = dict(vocab_size=151674, bos_token_id=151643, eos_token_id=151645)  # the InternVL3 tokenizer
_QWEN3_TOKENS = dict(vocab_size=151936, bos_token_id=151643, eos_token_id=151645)  # Qwen3's (InternVL3.5)


def _text(hidden, layers, heads, kv, inter, tie=False, **tokens):
    """A Qwen2 text config (InternVL3 1B-78B)."""
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_theta=1000000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                tie_word_embeddings=tie, hidden_act="silu", **(tokens or _INTERNVL3_TOKENS))


def _llama(hidden, layers, heads, kv, head_dim, inter, *, eps=1e-5, theta=50000000.0, factor=6.0, **tokens):
    """A Llama text config as the converter writes InternLM3's (no biases, explicit head_dim, dynamic NTK)."""
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                intermediate_size=inter, rms_norm_eps=eps, max_position_embeddings=32768, rope_theta=theta,
                rope_scaling={"rope_type": "dynamic", "factor": factor}, attention_bias=False, mlp_bias=False,
                tie_word_embeddings=False, hidden_act="silu", **(tokens or _INTERNVL3_TOKENS))


def _qwen3(hidden, layers, heads, kv, inter, tie, head_dim=128, **tokens):
    """A Qwen3 dense text config (the releases' head_dim is 128 whatever hidden / heads is; q_norm / k_norm; no
    biases)."""
    return dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                intermediate_size=inter, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0,
                rope_scaling=None, attention_bias=False, tie_word_embeddings=tie, hidden_act="silu",
                **(tokens or _QWEN3_TOKENS))


def _qwen3_moe(hidden, layers, heads, kv, experts, top_k, width, inter, head_dim=128, **tokens):
    """A Qwen3-MoE text config as Qwen/Qwen3-30B-A3B's and -235B-A22B's: Qwen3 attention, every layer a sparse
    block of `experts` experts of width `width`, `top_k` routed per token with renormalised weights; untied."""
    return dict(_qwen3(hidden, layers, heads, kv, inter, False, head_dim, **tokens), model_type="qwen3_moe",
                architectures=["Qwen3MoeForCausalLM"], num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=width, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


_INTERNLM3_TOKENS = dict(vocab_size=128512, bos_token_id=1, eos_token_id=2)
# image_token_id by release (the converter's for InternVL3-9B; the -HF configs' for InternVL3.5); else IMAGE_TOKEN_ID
_IMAGE_TOKEN_9B, _IMAGE_TOKEN_3_5 = 92546, 151671

PRESETS = {
    "tiny": dict(vision=_VISION_TINY, text=_text(64, 2, 4, 2, 128)),
    "small": dict(vision=_VISION_TINY, text=_text(128, 2, 4, 2, 256)),
    "tiny-llama": dict(vision=_VISION_TINY,
                       text=_llama(64, 2, 4, 2, 32, 128, eps=1e-6, theta=1000000.0, factor=2.0)),
    "small-llama": dict(vision=_VISION_TINY,
                        text=_llama(128, 2, 4, 2, 64, 256, eps=1e-6, theta=1000000.0, factor=2.0)),
    "tiny-qwen3": dict(vision=_VISION_TINY,
                       text=_qwen3(64, 2, 4, 2, 128, tie=True, head_dim=32, **_INTERNVL3_TOKENS)),
    "small-qwen3": dict(vision=_VISION_TINY,
                        text=_qwen3(128, 2, 4, 2, 256, tie=True, head_dim=64, **_INTERNVL3_TOKENS)),
    "tiny-qwen3-moe": dict(vision=_VISION_TINY, text=_qwen3_moe(64, 2, 4, 2, 6, 2, 32, 128, head_dim=32,
                                                                **_INTERNVL3_TOKENS)),
    "small-qwen3-moe": dict(vision=_VISION_TINY, text=_qwen3_moe(128, 2, 4, 2, 8, 2, 64, 256, head_dim=64,
                                                                 **_INTERNVL3_TOKENS)),
    "internvl3-1b": dict(vision=_VISION_300M, text=_text(896, 24, 14, 2, 4864)),
    "internvl3-2b": dict(vision=_VISION_300M, text=_text(1536, 28, 12, 2, 8960)),
    "internvl3-8b": dict(vision=_VISION_300M, text=_text(3584, 28, 28, 4, 18944)),
    "internvl3-9b": dict(vision=_VISION_300M, text=_llama(4096, 48, 32, 2, 128, 10240, **_INTERNLM3_TOKENS),
                         image_token_id=_IMAGE_TOKEN_9B),
    "internvl3-14b": dict(vision=_VISION_300M, text=_text(5120, 48, 40, 8, 13824)),
    "internvl3-38b": dict(vision=_VISION_6B, text=_text(5120, 64, 40, 8, 27648)),
    "internvl3-78b": dict(vision=_VISION_6B, text=_text(8192, 80, 64, 8, 29568)),
    "internvl3_5-1b": dict(vision=_VISION_300M, text=_qwen3(1024, 28, 16, 8, 3072, tie=True),
                           image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-2b": dict(vision=_VISION_300M, text=_qwen3(2048, 28, 16, 8, 6144, tie=True),
                           image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-4b": dict(vision=_VISION_300M, text=_qwen3(2560, 36, 32, 8, 9728, tie=True),
                           image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-8b": dict(vision=_VISION_300M, text=_qwen3(4096, 36, 32, 8, 12288, tie=False),
                           image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-14b": dict(vision=_VISION_300M, text=_qwen3(5120, 40, 40, 8, 17408, tie=False),
                            image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-38b": dict(vision=_VISION_6B, text=_qwen3(5120, 64, 64, 8, 25600, tie=False),
                            image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-30b-a3b": dict(vision=_VISION_300M, text=_qwen3_moe(2048, 48, 32, 4, 128, 8, 768, 6144),
                                image_token_id=_IMAGE_TOKEN_3_5),
    "internvl3_5-241b-a28b": dict(vision=_VISION_6B, text=_qwen3_moe(4096, 94, 64, 4, 128, 8, 1536, 12288),
                                  image_token_id=_IMAGE_TOKEN_3_5),
}
# other names of a preset: the issue and the language model's name call the flagship -241b-a22b
PRESET_ALIASES = {"internvl3_5-241b-a22b": "internvl3_5-241b-a28b"}


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
    """"internvl3-8b-awq" -> ("internvl3-8b", "awq"); a dense preset -> (name, None); an alias -> its preset."""
    base, _, suffix = name.rpartition("-")
    base = PRESET_ALIASES.get(base, base)
    if suffix in QUANT_BLOCKS and base in PRESETS:
        return base, suffix
    return PRESET_ALIASES.get(name, name), None


def is_moe_preset(name: str) -> bool:
    return PRESETS[name]["text"].get("num_experts", 0) > 0


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(f"{p}-{q}" for p in PRESETS for q in QUANT_BLOCKS if not is_moe_preset(p))


def preset_config(name: str) -> dict:
    """config.json contents (the transformers `-hf` form) of a preset."""
    base, quant = split_preset(name)
    if base not in PRESETS:
        raise UnsupportedModelError(f"unknown random preset {name!r}; choose one of {sorted(PRESETS)}, each also "
                                    f"as <preset>-awq or <preset>-fp8 (the dense ones)")
    if quant and is_moe_preset(base):
        raise UnsupportedModelError(f"random preset {name!r}: quantized experts ({quant}) are not supported; use "
                                    f"{base!r} (the mixture-of-experts presets have no -awq / -fp8 variants)")
    p = copy.deepcopy(PRESETS[base])
    vision = dict(model_type="internvl_vision", hidden_act="gelu", layer_norm_eps=1e-6, image_size=[TILE_SIZE] * 2,
                  patch_size=[PATCH_SIZE] * 2, use_mean_pooling=True, **p["vision"])
    return dict(model_type="internvl", architectures=["InternVLForConditionalGeneration"], vision_config=vision,
                text_config=p["text"], image_token_id=p.get("image_token_id", IMAGE_TOKEN_ID),
                image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=DOWNSAMPLE_RATIO,
                projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                tie_word_embeddings=p["text"]["tie_word_embeddings"], dtype="bfloat16",
                **({"quantization_config": copy.deepcopy(QUANT_BLOCKS[quant])} if quant else {}))
