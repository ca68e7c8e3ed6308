"""The original OpenGVLab (InternVLChatModel) layouts of every decoder family load to the same logits as their -hf
form: a Llama decoder as InternLM2 stores it (packed `wqkv` grouped by KV head, wo, feed_forward.w1/w2/w3,
attention_norm / ffn_norm, tok_embeddings, output; llm_config InternLM2ForCausalLM) and as InternLM3 stores it
(transformers' Llama names; llm_config InternLM3ForCausalLM), and a Qwen3 decoder (Qwen3ForCausalLM). Each original
checkpoint is written here from the -hf one by the inverse of transformers' convert_internvl_weights_to_hf.py
(ORIGINAL_TO_CONVERTED_KEY_MAPPING_TEXT_LLAMA, and its wqkv split:
rearrange(wqkv, "(h gs d) z -> h gs d z", gs=2 + H/Hk, d=head_dim); q = [:, :H/Hk], k = [:, -2], v = [:, -1]).
Under tensor parallelism each rank reads only its run of wqkv's KV-head groups."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import LLM
from internvl_engine.config import ModelConfig
from internvl_engine.errors import UnsupportedModelError
from internvl_engine.parallel import TensorParallel
from test_loader import CONV, PARAMS, _copy_side_files, to_original

TEXT_CONV = [{"role": "user", "content": "Tell me a story about a dragon and a knight."}]
# the image token id OpenGVLab's config.json leaves out, per decoder family (what _from_original assumes)
FAMILY_IMAGE_TOKEN = {"qwen2": 151667, "llama": 92546, "qwen3": 151671}


# ---------------------------------------------------------------------------------------- -hf -> original
def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv from q [H*d, ...], k and v [Hk*d, ...]: per KV head, its H/Hk query heads, its key head,
    its value head (the layout the converter's rearrange splits)."""
    rest = q.shape[1:]
    groups = [q.reshape(kv_heads, -1, *rest), k.reshape(kv_heads, -1, *rest), v.reshape(kv_heads, -1, *rest)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def converter_split(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """convert_internvl_weights_to_hf.py's split of wqkv (its rearrange, written with reshape)."""
    g = heads // kv_heads
    qkv = wqkv.reshape(kv_heads, g + 2, head_dim, *wqkv.shape[1:])
    return (qkv[:, :g].reshape(-1, *wqkv.shape[1:]), qkv[:, -2].reshape(-1, *wqkv.shape[1:]),
            qkv[:, -1].reshape(-1, *wqkv.shape[1:]))


# transformers' Llama names -> InternLM2's (the converter's mapping, inverted), inside language_model.model.
_TO_INTERNLM2 = [("embed_tokens.", "tok_embeddings."), ("self_attn.o_proj.", "attention.wo."),
                 ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.down_proj.", "feed_forward.w2."),
                 ("mlp.up_proj.", "feed_forward.w3."), ("input_layernorm.", "attention_norm."),
                 ("post_attention_layernorm.", "ffn_norm.")]


def to_internlm2_names(tensors: dict, text: dict) -> dict:
    """The language model's tensors in InternLM2's layout; the rest as they are."""
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    out = {}
    for key, t in tensors.items():
        if key == "language_model.lm_head.weight":
            out["language_model.output.weight"] = t
            continue
        if not key.startswith("language_model.model."):
            out[key] = t
            continue
        rest = key[len("language_model.model."):]
        if ".self_attn." in rest and rest.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            layer, leaf = rest.split(".self_attn.")[0], rest.rsplit(".", 1)[1]
            if rest.endswith(f"q_proj.{leaf}"):
                parts = [tensors[f"language_model.model.{layer}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                out[f"language_model.model.{layer}.attention.wqkv.{leaf}"] = pack_wqkv(*parts, kv_heads)
            continue
        for old, new in _TO_INTERNLM2:
            rest = rest.replace(old, new)
        out["language_model.model." + rest] = t
    return out


def original_llm_config(text: dict, style: str) -> dict:
    """llm_config as OpenGVLab's config.json writes it for an -hf text_config (transformers 5's rope_parameters
    become rope_theta + rope_scaling, as 4.x config classes write them)."""
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e6)}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "hidden_act")
    llm = {k: text[k] for k in keep if k in text}
    llm["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        llm["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    bias = bool(text.get("attention_bias", False))
    if style == "internlm2":
        assert text["hidden_size"] == text["num_attention_heads"] * text["head_dim"], "InternLM2 states no head_dim"
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=bias,
                   attn_implementation="eager")
    elif style == "internlm3":
        llm.update(architectures=["InternLM3ForCausalLM"], model_type="internlm3", head_dim=text["head_dim"],
                   qkv_bias=bias, bias=False)
    else:
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=text["head_dim"],
                   attention_bias=bias)
    return llm


def write_original(hf_path, dst, style: str):
    """The -hf checkpoint at hf_path rewritten in the original layout of `style` ("internlm2", "internlm3",
    "qwen3") under dst, side files (tokenizer, template, processor) copied."""
    tensors = load_file(str(hf_path / "model.safetensors"))
    config = json.loads((hf_path / "config.json").read_text())
    text = config["text_config"]
    tensors, orig = to_original(tensors, {**config, "text_config": {**text, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1.0, "factor": 1.0}}})  # its llm_config is replaced below
    if style == "internlm2":
        tensors = to_internlm2_names(tensors, text)
    orig["llm_config"] = original_llm_config(text, style)
    family = {"internlm2": "llama", "internlm3": "llama", "qwen3": "qwen3"}[style]
    if config["image_token_id"] != FAMILY_IMAGE_TOKEN[family]:  # the test tokenizer's; OpenGVLab's files omit it
        orig["img_context_token_id"] = config["image_token_id"]
    _copy_side_files(hf_path, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(orig))
    return dst


def _logits(path, conv):
    return LLM(path, dtype="float32", device="cpu").prompt_logits(conv, params=PARAMS)


# ---------------------------------------------------------------------------------------------- tests
def test_pack_wqkv_is_what_the_converter_splits():
    q, k, v = torch.randn(6 * 4, 5), torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    wqkv = pack_wqkv(q, k, v, kv_heads=2)
    assert wqkv.shape == (10 * 4, 5)
    for got, want in zip(converter_split(wqkv, 6, 2, 4), (q, k, v)):
        assert torch.equal(got, want)
