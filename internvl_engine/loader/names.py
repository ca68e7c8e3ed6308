"""Checkpoint keys <-> this model's parameter names, in the three layouts InternVL checkpoints use (spec section 5):
  -hf files:        vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight
  model.-prefixed:  model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  original:         vision_model.* (fused attn.qkv), mlp1.{0,1,3}.*, language_model.model.*, language_model.lm_head.*
                    (Qwen2, Qwen3, Llama and InternLM3 language models: transformers' names), or InternLM2's
                    language_model.model.{tok_embeddings, layers.N.attention.wqkv / wo, feed_forward.w1 / w2 / w3,
                    attention_norm, ffn_norm, norm}, language_model.output
Every key is renamed once to the module names of models/internvl.py; q/k/v and gate/up name their shard of a
packed matmul (InternLM2's wqkv fills all three: QKV_GROUPED). export_hf_state_dict is the way back, to the -hf
layout."""
from __future__ import annotations

import re

import torch

from ..layers.linear import QKV_GROUPED

# Prefix renames, first match wins. Original-layout names are mapped to the -hf names here.
_RENAMES = [
    (r"^model\.(vision_tower|multi_modal_projector|language_model)\.", r"\1."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.output\.", "lm_head."),  # InternLM2
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
# Inside the language model, InternLM2's names -> transformers' Llama names, as convert_internvl_weights_to_hf.py
# renames them (ORIGINAL_TO_CONVERTED_KEY_MAPPING_TEXT_LLAMA; its `output` -> lm_head is the prefix rename above).
# wqkv holds q, k and v grouped by KV head and is read as one tensor (QKV_GROUPED).
_INTERNLM2 = [(r"^language_model\.tok_embeddings\.", "language_model.embed_tokens."),
              (r"\.attention\.wo\.", ".self_attn.o_proj."), (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
              (r"\.feed_forward\.w2\.", ".mlp.down_proj."), (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
              (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm.")]
_INTERNLM2_WQKV = re.compile(r"^(language_model\.layers\.\d+\.)attention\.wqkv\.(\w+)$")
# Separate projections in the checkpoint -> (packed module, shard name).
PACKED = {"attention.q_proj": ("attention.qkv", "q_proj"), "attention.k_proj": ("attention.qkv", "k_proj"),
          "attention.v_proj": ("attention.qkv", "v_proj"),
          "self_attn.q_proj": ("self_attn.qkv_proj", "q_proj"), "self_attn.k_proj": ("self_attn.qkv_proj", "k_proj"),
          "self_attn.v_proj": ("self_attn.qkv_proj", "v_proj"),
          "mlp.gate_proj": ("mlp.gate_up_proj", "gate_proj"), "mlp.up_proj": ("mlp.gate_up_proj", "up_proj")}
# Qwen3-MoE experts (models/moe.py): one tensor per expert and projection fills its slot of the layer's 3-D parameter
# (shard "<expert>.<projection>"); the 3-D form transformers holds in memory fills the whole parameter.
_EXPERT = re.compile(r"^(language_model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERTS_3D = re.compile(r"^(language_model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


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
    elif name.startswith("language_model."):
        wqkv = _INTERNLM2_WQKV.match(name)
        if wqkv:
            return f"{wqkv.group(1)}self_attn.qkv_proj.{wqkv.group(2)}", QKV_GROUPED
        for pattern, repl in _INTERNLM2:
            name = re.sub(pattern, repl, name)
        expert = _EXPERT.match(name)
        if expert:
            packed = "down_proj" if expert.group(3) == "down_proj" else "gate_up_proj"
            return f"{expert.group(1)}.{packed}.weight", f"{expert.group(2)}.{expert.group(3)}"
        fused = _EXPERTS_3D.match(name)
        if fused:
            return f"{fused.group(1)}.{fused.group(2)}.weight", None
    module, _, leaf = name.rpartition(".")
    for suffix, (packed, shard) in PACKED.items():
        if module.endswith(suffix):
            return f"{module[: -len(suffix)]}{packed}.{leaf}", shard
    return name, None


def export_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse mapping: our parameters under the `-hf` file-layout keys, packed matmuls split again.
    An lm_head tied to the embeddings is omitted, as transformers' save_pretrained does; MoE experts are written per
    expert, as save_pretrained writes them."""
    out: dict[str, torch.Tensor] = {}
    tied = model.lm_head.weight is model.language_model.embed_tokens.weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and tied:
            continue
        module, _, leaf = name.rpartition(".")
        pieces = [(name, param.data)]
        experts = model.get_submodule(module)
        if hasattr(experts, "checkpoint_tensors"):  # a MoE layer's experts, one tensor per expert and projection
            pieces = list(experts.checkpoint_tensors(module.rpartition(".")[0]))
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
