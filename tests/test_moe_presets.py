"""The mixture-of-experts presets (config/presets.py), what `info --model` says of them, and the GPT-OSS refusal:
the real InternVL3.5-30B-A3B and -241B-A28B shapes (the issue's numbers, checked against the public configs in the
presets' docstring), their test twins running end to end, and InternVL3.5-GPT-OSS-20B-A4B named with what it needs."""
import json

import pytest

from internvl_engine import LLM, SamplingParams
from internvl_engine.cli import main
from internvl_engine.config import ModelConfig, preset_config, preset_names
from internvl_engine.errors import UnsupportedModelError

MOE = {  # preset: (layers, hidden, heads, KV heads, experts, top-k, expert width, vision hidden, vision layers)
    "internvl3_5-30b-a3b": (48, 2048, 32, 4, 128, 8, 768, 1024, 24),
    "internvl3_5-241b-a28b": (94, 4096, 64, 4, 128, 8, 1536, 3200, 45),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_presets_have_the_release_shapes(name):
    cfg = ModelConfig.from_dict(preset_config(name), name)
    t, v = cfg.text, cfg.vision
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.num_experts,
            t.num_experts_per_tok, t.moe_intermediate_size, v.hidden_size, v.num_hidden_layers) == MOE[name]
    assert (t.model_type, t.head_dim, t.qk_norm, t.norm_topk_prob, t.vocab_size) == ("qwen3_moe", 128, True, True,
                                                                                    151936)
    assert t.moe_layers == list(range(t.num_hidden_layers)) and not cfg.lm_head_may_tie
    assert cfg.image_token_id == 151671 and cfg.max_model_len == 40960


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_presets_shard_over_the_gpus_they_need(name):
    """30B-A3B (61.7 GB in bf16) on 1-8 GPUs, 241B-A28B (481 GB) on 8: 4 KV heads replicated past N = 4, the
    expert widths 768 and 1536 split in whole features."""
    from internvl_engine.parallel import check_shardable
    text = ModelConfig.from_dict(preset_config(name)).text
    for n in (2, 4, 8):
        check_shardable(text, n)


def test_the_flagship_answers_to_its_language_models_name():
    assert preset_config("internvl3_5-241b-a22b") == preset_config("internvl3_5-241b-a28b")
    assert main(["info", "--model", "random:internvl3_5-241b-a22b"]) == 0


@pytest.mark.parametrize("name", ["internvl3_5-30b-a3b-awq", "internvl3_5-241b-a22b-fp8", "tiny-qwen3-moe-awq"])
def test_quantized_moe_presets_are_refused_by_name(name):
    """The experts are dense weights only (ModelConfig refuses a quantized MoE checkpoint), so no -awq / -fp8
    variant is listed, and asking for one names the preset and what it lacks."""
    assert name not in preset_names()
    with pytest.raises(UnsupportedModelError, match=rf"random preset '{name}': quantized experts"):
        preset_config(name)
    assert {"internvl3_5-30b-a3b", "internvl3_5-241b-a28b", "tiny-qwen3-moe", "small-qwen3-moe"} <= set(preset_names())


@pytest.fixture(scope="module")
def tiny_moe():
    return LLM("random:tiny-qwen3-moe", dtype="float32", device="cpu", backend="torch")


def test_tiny_moe_twin_runs_end_to_end(tiny_moe):
    """tiny-qwen3-moe (6 experts, 2 a token) builds with random weights, every expert its own, and generates;
    a text request alone and beside others decodes the same tokens."""
    llm = tiny_moe
    t = llm.config.text
    assert (t.num_experts, t.num_experts_per_tok, t.moe_layers) == (6, 2, [0, 1])
    experts = [p for k, p in llm.runner.model.named_parameters() if ".experts." in k or k.endswith("w13")]
    assert experts, "the MoE layers hold expert weights"
    for p in experts:
        flat = p.detach().reshape(t.num_experts, -1) if p.shape[0] == t.num_experts else p.detach().reshape(1, -1)
        assert flat.abs().sum(1).min() > 0 and len({tuple(r[:4].tolist()) for r in flat}) == flat.shape[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = llm.generate(["Tell me about rivers."], params)[0].token_ids
    batch = llm.generate(["Tell me about rivers.", "Name three colours.", "Count to five."], params)
    assert len(alone) == 6 and batch[0].token_ids == alone


def test_the_harness_baseline_is_transformers_holding_the_engines_experts(tiny_moe):
    """bench/hf_baseline.py stacks the engine's per-expert tensors into transformers' 3-D expert parameters: its
    InternVLForConditionalGeneration then gives the engine's prompt logits (fp32, within 1e-4)."""
    import torch

    from internvl_engine.bench.hf_baseline import HFBaseline
    hf = HFBaseline(tiny_moe, "random:tiny-qwen3-moe", 1)
    experts = hf.model.model.language_model.layers[1].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (6, 2 * 32, 64) and tuple(experts.down_proj.shape) == (6, 64, 32)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Describe a quiet morning by the river."}]}]
    inputs = hf.processor(text=hf._texts([conv])[0], return_tensors="pt")
    with torch.inference_mode():
        reference = hf.model(**inputs).logits[0].float()
    assert (tiny_moe.prompt_logits(conv) - reference).abs().max().item() < 1e-4


def test_info_prints_the_experts(capsys):
    assert main(["info", "--model", "random:internvl3_5-30b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "decoder: qwen3_moe, 48 layers x 2048, 32 heads / 4 KV heads of 128" in out
    assert ("experts: 128 routed, top-8 (renormalised), expert width 768, in 48 of 48 layers; active 3.35B of "
            "30.53B LM parameters (with vision 3.67B of 30.85B)") in out
    assert "LM bytes a decode step reads: 6.084 GB at batch 1 (8 experts a layer; every expert: 60.442 GB)" in out
    assert main(["info", "--json", "--model", "random:internvl3_5-241b-a22b"]) == 0
    moe = json.loads(capsys.readouterr().out)["model"]["weights"]["moe"]
    assert (moe["experts"], moe["experts_per_token"], moe["expert_width"], moe["moe_layers"]) == (128, 8, 1536, 94)
    assert moe["lm_total_params"] == pytest.approx(235.1e9, rel=0.001)
    assert main(["info", "--model", "random:internvl3_5-8b"]) == 0
    assert "experts:" not in capsys.readouterr().out


GPT_OSS_LACKS = r"attention sinks.*sliding-window attention on alternating layers.*MXFP4 expert weights"


@pytest.mark.parametrize("form", ["hf", "original"])
def test_gpt_oss_internvl_is_refused_with_what_it_lacks(form):
    """InternVL3.5-GPT-OSS-20B-A4B: its -HF text_config is model_type gpt_oss (GptOssForCausalLM), its original
    llm_config names the architecture; either way an UnsupportedModelError names the field and the missing features,
    and lists the decoders implemented."""
    gpt_oss = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_local_experts": 32,
               "num_experts_per_tok": 4, "sliding_window": 128}
    if form == "hf":
        raw, field = dict(preset_config("tiny"), text_config=gpt_oss), r"text_config\.model_type 'gpt_oss'"
    else:
        raw = {"model_type": "internvl_chat", "vision_config": {}, "ps_version": "v2", "llm_config": gpt_oss}
        field = r"llm_config\.architectures \['GptOssForCausalLM'\]"
    with pytest.raises(UnsupportedModelError, match=rf"{field} \(GPT-OSS.*{GPT_OSS_LACKS}.*implemented are qwen2") as e:
        ModelConfig.from_dict(raw)
    assert "qwen3_moe (Qwen3MoeForCausalLM)" in str(e.value)
