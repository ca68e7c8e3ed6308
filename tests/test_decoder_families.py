"""The decoder families as data (config/model.py TEXT_FAMILIES, models/decoder.py): what each family's text config
turns into, the refusals that name the field, the per-head q/k norm through the op table on every backend, and the
Llama biases (attention_bias, mlp_bias) against transformers. The four-prompt parity of the Llama and Qwen3
variants on every backend is test_model_parity's (its VARIANTS)."""
import pytest
import torch

from internvl_engine import LLM, SamplingParams, ops
from internvl_engine.config import ModelConfig
from internvl_engine.errors import KernelInputError, UnsupportedModelError
from kernel_cases import BACKENDS, assert_close, backend
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits


def _config(text: dict) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "internvl", "text_config": text, "vision_config": {}})


# A Llama text config of the kind transformers' converter writes for an InternLM3 / InternLM2.5 decoder (the sizes
# here only illustrate: the real shapes, with their sources, are config/presets.py's): GQA, an explicit head_dim,
# dynamic NTK in transformers 5's rope_parameters form.
LLAMA_TEXT = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128512, hidden_size=4096,
                          intermediate_size=10240, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
                          head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, attention_bias=False,
                          mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                          rope_parameters={"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000000})


def test_llama_config():
    t = _config(LLAMA_TEXT).text
    assert (t.model_type, t.head_dim, t.num_key_value_heads, t.rope_type, t.rope_factor, t.rope_theta) == \
        ("llama", 128, 2, "dynamic", 6.0, 5e7)
    assert not (t.qkv_bias or t.o_proj_bias or t.mlp_bias or t.qk_norm)
    assert (t.bos_token_id, t.eos_token_id, t.tie_word_embeddings) == (1, 2, False)


def test_llama_config_as_the_converter_writes_it():
    """transformers' converter builds LlamaConfig(**llm_config): the original architectures stay in the -hf file."""
    for arch in ("InternLM3ForCausalLM", "InternLM2ForCausalLM"):
        assert _config(dict(LLAMA_TEXT, architectures=[arch])).text.model_type == "llama"


def test_llama_biases_and_defaults():
    t = _config(dict(model_type="llama", hidden_size=96, num_attention_heads=6, attention_bias=True,
                     mlp_bias=True)).text
    assert (t.qkv_bias, t.o_proj_bias, t.mlp_bias, t.qk_norm) == (True, True, True, False)
    # LlamaConfig's defaults where the file is silent: head_dim hidden / heads, 2048 positions, bos 1, eos 2
    assert (t.head_dim, t.max_position_embeddings, t.bos_token_id, t.eos_token_id) == (16, 2048, 1, 2)


def test_qwen3_config():
    t = _config(dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, eos_token_id=151645,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000})).text
    assert (t.model_type, t.head_dim, t.qk_norm, t.qkv_bias, t.o_proj_bias, t.mlp_bias) == \
        ("qwen3", 128, True, False, False, False)
    assert (t.rope_type, t.rope_theta, t.tie_word_embeddings, t.eos_token_id) == ("default", 1e6, True, 151645)
    # Qwen3Config's head_dim is 128 when the file does not state one, whatever hidden / heads is
    assert _config(dict(model_type="qwen3", hidden_size=1024, num_attention_heads=16)).text.head_dim == 128
    assert _config(dict(model_type="qwen3", attention_bias=True)).text.o_proj_bias


def test_qwen2_config_keeps_its_biases():
    """Qwen2 has q/k/v bias whatever attention_bias says (transformers' Qwen2Attention hard-codes it), no o_proj
    bias, and no q/k norm."""
    t = _config(dict(model_type="qwen2", hidden_size=896, num_attention_heads=14, attention_bias=False)).text
    assert (t.model_type, t.qkv_bias, t.o_proj_bias, t.mlp_bias, t.qk_norm, t.head_dim) == \
        ("qwen2", True, False, False, False, 64)


@pytest.mark.parametrize("text,match", [
    (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]), r"text_config\.model_type 'qwen2_moe'"),
    (dict(model_type="gpt_oss"), r"text_config\.model_type 'gpt_oss'"),
    (dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"]), r"text_config\.model_type 'internlm2'"),
    (dict(model_type="llama", architectures=["MixtralForCausalLM"]),
     r"text_config\.architectures \['MixtralForCausalLM'\] is not a 'llama' decoder"),
    (dict(model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"text_config\.rope_parameters rope type 'llama3' is not supported \(default, linear, dynamic\)"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"text_config\.rope_scaling rope type 'yarn'"),
    (dict(model_type="qwen3", use_sliding_window=True), r"text_config\.use_sliding_window"),
    (dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"text_config\.rope_parameters\.partial_rotary_factor 0\.5 is not supported"),
])
def test_unsupported_decoders_name_the_field(text, match):
    with pytest.raises(UnsupportedModelError, match=match) as e:
        _config(text)
    if "model_type" in match or "architectures" in match:
        assert "qwen2 (Qwen2ForCausalLM), llama (LlamaForCausalLM/InternLM3ForCausalLM/InternLM2ForCausalLM), " \
               "qwen3 (Qwen3ForCausalLM)" in str(e.value)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_rms_norm_over_heads(backend_name, device):
    """The q/k norm is the op table's rms_norm over [T, heads, head_dim]: each head's row normalised on its own,
    with one [head_dim] weight (head_dim 24: not a power of two). The kernels take contiguous input only; a
    token-strided view of the packed qkv output (as q is before the decoder copies it) is a typed error."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(5, 4 * 24 + 2 * 2 * 24, generator=g) * 3
    q = packed[:, :96].view(5, 4, 24)
    w = 1 + 0.1 * torch.randn(24, generator=g)
    xd = q.double()
    ref = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    with backend(backend_name, device):
        qd, wd = q.to(device), w.to(device)
        assert_close(ops.rms_norm(qd.contiguous(), wd, 1e-6), ref, torch.float32)
        with pytest.raises(KernelInputError, match="rms_norm: x must be contiguous"):
            ops.rms_norm(qd, wd, 1e-6)


def test_llama_biases_match_transformers(hf_checkpoint):
    """attention_bias (q/k/v and o_proj) and mlp_bias (gate/up/down) on a Llama decoder: prompt logits and 16
    greedy tokens as transformers computes them, text and one image."""
    from test_model_parity import ATOL, CONVERSATIONS, MAX_TILES

    path, hf_model = hf_checkpoint("llama-biases-300m")
    llm = LLM(path, dtype="float32", device="cpu")
    assert llm.model.language_model.layers[0].self_attn.o_proj.bias is not None
    assert llm.model.language_model.layers[0].mlp.down_proj.bias is not None
    params = SamplingParams(max_tokens=16, return_logits=True, ignore_eos=True, max_num_tiles=MAX_TILES)
    for kind in ("text", "one_image"):
        conv = CONVERSATIONS[kind]
        inputs = hf_inputs(make_hf_processor(path), conv, MAX_TILES)
        assert (llm.prompt_logits(conv, params=params) - hf_logits(hf_model, inputs)).abs().max().item() <= ATOL
        out = llm.generate(conv, params)[0]
        ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 16)
        assert out.token_ids == ref_ids
        assert (out.logits - ref_step_logits).abs().max().item() <= ATOL


def test_llm_reads_eos_from_text_config_and_generation_config(hf_checkpoint, tmp_path):
    """LLM("path") of a Llama-decoder checkpoint stops on every eos id the text config and generation_config.json
    name (InternVL3-9B-hf: the Llama config's eos and <|im_end|> in generation_config)."""
    import json
    import shutil

    from test_model_parity import CONVERSATIONS

    src, _ = hf_checkpoint("llama-300m")
    path = shutil.copytree(src, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(path, dtype="float32", device="cpu")
    free = llm.generate(CONVERSATIONS["text"], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, free[2]]}))
    llm = LLM(path, dtype="float32", device="cpu")
    assert set(llm.eos_token_ids) == {2, 151645, free[2]}
    out = llm.generate(CONVERSATIONS["text"], SamplingParams(max_tokens=4))[0]
    stop = min(i for i, t in enumerate(free) if t in llm.eos_token_ids)
    assert out.token_ids == free[:stop + 1] and out.finish_reason == "stop"
