"""The random presets (config/presets.py): every one parses to the decoder family its release ships, and runs with
the built-in tokenizer whose <IMG_CONTEXT> id it states (InternVL3's Qwen2.5 vocabulary or InternVL3.5's Qwen3
one), or is refused by name before anything is allocated (InternVL3-9B's InternLM3 vocabulary)."""
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.config import PRESETS, ModelConfig, preset_config
from internvl_engine.errors import UnsupportedModelError
from internvl_engine.loader import write_checkpoint
from internvl_engine.processor import Processor
from internvl_engine.processor.tokenizer import build_internvl3_tokenizer_json, builtin_tokenizer_json

IMAGE = Image.fromarray(np.random.default_rng(5).integers(0, 256, (200, 300, 3), dtype=np.uint8))
CONV = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "<think>"}]}]


def _family(name: str) -> str:
    if name.endswith(("-moe", "-a3b", "-a28b")):
        return "qwen3_moe"
    if name.startswith("internvl3_5-") or name.endswith("qwen3"):
        return "qwen3"
    return "llama" if name == "internvl3-9b" or name.endswith("llama") else "qwen2"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_its_release_family(name):
    cfg = ModelConfig.from_dict(preset_config(name), name)
    t = cfg.text
    assert t.model_type == _family(name)
    assert (t.qkv_bias, t.qk_norm) == {"qwen2": (True, False), "llama": (False, False), "qwen3": (False, True),
                                       "qwen3_moe": (False, True)}[t.model_type]
    if name.startswith("internvl3_5-"):  # Qwen3: head_dim 128 whatever hidden / heads; tied up to Qwen3-4B
        assert t.head_dim == 128 and cfg.image_token_id == 151671 and t.vocab_size == 151936
        assert cfg.lm_head_may_tie == (name in ("internvl3_5-1b", "internvl3_5-2b", "internvl3_5-4b"))
    elif name == "internvl3-9b":  # transformers' converter: LlamaConfig, InternLM2-era token ids
        assert (t.head_dim, t.num_key_value_heads, t.vocab_size, cfg.image_token_id) == (128, 2, 128512, 92546)
        assert (t.rope_type, t.rope_factor, t.rope_theta) == ("dynamic", 6.0, 5e7)
    else:
        assert cfg.image_token_id == 151667


def test_internvl3_tokenizer_is_unchanged():
    added = {t["id"]: t["content"] for t in build_internvl3_tokenizer_json()["added_tokens"]}
    assert max(added) == 151674 and added[151664] == "<|file_sep|>"
    assert [added[i] for i in (151665, 151666, 151667)] == ["<img>", "</img>", "<IMG_CONTEXT>"]


def test_internvl3_5_presets_get_the_qwen3_tokenizer():
    """Qwen3's specials up to </think> 151668, then InternVL's tokens: <IMG_CONTEXT> at the -HF configs' 151671."""
    cfg = ModelConfig.from_dict(preset_config("internvl3_5-8b"), "internvl3_5-8b")
    processor = Processor.from_parts(builtin_tokenizer_json(cfg), None, model_config=cfg)
    ids = processor(CONV, max_num_tiles=1).input_ids
    assert ids.count(151671) == cfg.image_seq_length and 151669 in ids and 151670 in ids
    assert 151667 in ids  # <think>: one token in this vocabulary (InternVL3's spells it out)


def test_a_qwen3_vocabulary_preset_runs_end_to_end(monkeypatch, tmp_path):
    """tiny-qwen3's shapes with InternVL3.5's vocabulary and image token: the image's tokens reach the model, and
    the checkpoint the preset writes (with that tokenizer) runs identically."""
    three_five = dict(PRESETS["tiny-qwen3"], image_token_id=151671)
    three_five["text"] = dict(three_five["text"], vocab_size=151936)
    monkeypatch.setitem(PRESETS, "tiny-qwen3-vocab", three_five)
    llm = LLM("random:tiny-qwen3-vocab", dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=3, ignore_eos=True, return_logits=True, max_num_tiles=1)
    out = llm.generate(CONV, params)[0]
    assert len(out.token_ids) == 3 and out.logits.shape == (3, 151936)
    assert out.prompt_token_ids.count(151671) == llm.config.image_seq_length
    written = LLM(write_checkpoint(tmp_path / "ckpt", "tiny-qwen3-vocab"), dtype="float32", device="cpu")
    again = written.generate(CONV, params)[0]
    assert again.prompt_token_ids == out.prompt_token_ids and torch.equal(again.logits, out.logits)


def test_internvl3_9b_preset_is_refused_by_the_engine_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"random:internvl3-9b: image_token_id 92546 .* neither built-in"):
        LLM("random:internvl3-9b", dtype="float32", device="cpu")
    with pytest.raises(UnsupportedModelError, match=r"random:internvl3-9b: image_token_id 92546"):
        write_checkpoint(tmp_path, "internvl3-9b")  # before building the 9B model


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny"])
def test_a_preset_is_the_model_transformers_builds_from_its_config(name, tmp_path):
    """The harness's baseline (bench/hf_baseline.py) is transformers' model built from the preset's config.json,
    given the engine's weights: a tied preset's head must be its embedding in the engine too (an independently
    drawn head once put its prompt logits 7.6 away from transformers'), and its checkpoint stores no lm_head."""
    from internvl_engine.bench.hf_baseline import HFBaseline
    from safetensors import safe_open

    llm = LLM(f"random:{name}", dtype="float32", device="cpu")
    hf = HFBaseline(llm, f"random:{name}", 1)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Describe a quiet morning by the river."}]}]
    inputs = hf.processor(text=hf._texts([conv])[0], return_tensors="pt")
    with torch.inference_mode():
        reference = hf.model(**inputs).logits[0].float()
    assert (llm.prompt_logits(conv) - reference).abs().max().item() < 1e-4
    with safe_open(str(write_checkpoint(tmp_path / name, name) / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert ("language_model.lm_head.weight" in stored) == (not ModelConfig.from_dict(preset_config(name)).ties_lm_head)
