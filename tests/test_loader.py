"""Every checkpoint layout of spec section 5 loads to the same logits: the -hf files transformers writes, the
`model.`-prefixed layout (transformers' in-memory names), the original OpenGVLab layout with fused qkv and mlp1,
a sharded index, and the random-preset writer's output read back by transformers."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from internvl_engine import LLM, SamplingParams
from internvl_engine.loader import write_checkpoint
from hf_processor import make_hf_processor
from reference import hf_inputs, hf_logits

IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 260, 3), dtype=np.uint8))
CONV = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}]
PARAMS = SamplingParams(max_num_tiles=2)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


def _copy_side_files(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def _logits(path):
    return LLM(path, dtype="float32", device="cpu").prompt_logits(CONV, params=PARAMS)


def to_original(hf_tensors: dict, hf_config: dict) -> tuple[dict, dict]:
    """-hf file layout -> OpenGVLab InternVLChatModel layout (the inverse of spec table 5.3)."""
    out = {}
    renames = [("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
               ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
               ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
               ("multi_modal_projector.layer_norm.", "mlp1.0."), ("multi_modal_projector.linear_1.", "mlp1.1."),
               ("multi_modal_projector.linear_2.", "mlp1.3.")]
    layer_renames = [("attention.projection_layer.", "attn.proj."), ("attention.q_norm.", "attn.q_norm."),
                     ("attention.k_norm.", "attn.k_norm."), ("layernorm_before.", "norm1."),
                     ("layernorm_after.", "norm2."), ("lambda_1", "ls1"), ("lambda_2", "ls2"), ("mlp.", "mlp.")]
    for key, t in hf_tensors.items():
        if key.startswith("vision_tower.encoder.layer."):
            idx, rest = key[len("vision_tower.encoder.layer."):].split(".", 1)
            prefix = f"vision_model.encoder.layers.{idx}."
            if rest.startswith(("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")):
                leaf = rest.rsplit(".", 1)[1]
                if rest.startswith("attention.q_proj."):
                    parts = [hf_tensors[f"vision_tower.encoder.layer.{idx}.attention.{p}_proj.{leaf}"] for p in "qkv"]
                    out[f"{prefix}attn.qkv.{leaf}"] = torch.cat(parts)
                continue
            for old, new in layer_renames:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[prefix + rest] = t
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t
    v, text = hf_config["vision_config"], dict(hf_config["text_config"])
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"], rope_scaling={"type": rope["rope_type"], "factor": rope["factor"]},
                architectures=["Qwen2ForCausalLM"])
    config = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "template": "internvl2_5",
              "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 448,
              "vision_config": {"model_type": "intern_vit_6b", "hidden_size": v["hidden_size"],
                                "num_hidden_layers": v["num_hidden_layers"],
                                "num_attention_heads": v["num_attention_heads"],
                                "intermediate_size": v["intermediate_size"], "qkv_bias": v["attention_bias"],
                                "qk_normalization": v["use_qk_norm"], "norm_type": v["norm_type"],
                                "layer_norm_eps": v["layer_norm_eps"], "image_size": 448, "patch_size": 14,
                                "hidden_act": "gelu"},
              "llm_config": text}
    return out, config


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_layouts_load_to_identical_logits(hf_checkpoint, tmp_path, variant):
    path, hf_model = hf_checkpoint(variant)
    reference = _logits(path)
    assert (reference - hf_logits(hf_model, hf_inputs(make_hf_processor(path), CONV, 2))).abs().max() <= 1e-4
    files = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())

    prefixed = tmp_path / "prefixed"  # transformers' in-memory names: model.vision_tower.*, lm_head.weight
    _copy_side_files(path, prefixed)
    shutil.copy(path / "config.json", prefixed / "config.json")
    save_file({k: v.clone() for k, v in hf_model.state_dict().items()}, str(prefixed / "model.safetensors"))
    assert torch.equal(_logits(prefixed), reference)

    original = tmp_path / "original"
    _copy_side_files(path, original)
    tensors, orig_config = to_original(files, config)
    assert any(k.endswith("attn.qkv.weight") for k in tensors) and "mlp1.1.weight" in tensors
    save_file(tensors, str(original / "model.safetensors"))
    (original / "config.json").write_text(json.dumps(orig_config))
    assert torch.equal(_logits(original), reference)

    sharded = tmp_path / "sharded"  # two shards and an index, as the hub stores the larger models
    _copy_side_files(path, sharded)
    shutil.copy(path / "config.json", sharded / "config.json")
    keys = sorted(files)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: files[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(_logits(sharded), reference)


def test_bf16_load_casts_on_the_way(hf_checkpoint):
    path, _ = hf_checkpoint("300m")
    llm = LLM(path, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in llm.model.parameters())
    out = llm.generate(CONV, SamplingParams(max_tokens=4, max_num_tiles=2))[0]
    assert len(out.token_ids) == 4


def test_random_preset_writer_is_a_valid_hf_checkpoint(tmp_path):
    """write_checkpoint (used by the demo) writes files transformers loads to the same logits as ours."""
    from transformers import InternVLForConditionalGeneration

    path = write_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    hf_model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ours = _logits(path)
    ref = hf_logits(hf_model, hf_inputs(make_hf_processor(path), CONV, 2))
    assert (ours - ref).abs().max().item() <= 1e-4
    # the in-memory random: preset with the same seed has the same weights as the written checkpoint
    mem = LLM("random:tiny", dtype="float32", device="cpu", seed=0).prompt_logits(CONV, params=PARAMS)
    assert torch.equal(mem, ours)
