"""The Qwen3-MoE decoder (InternVL3.5-30B-A3B / 241B-A28B; config/model.py's qwen3_moe, models/moe.py) against
transformers' InternVLForConditionalGeneration with a qwen3_moe text config, on random-weight checkpoints it wrote
itself (tests/checkpoints.py: "qwen3moe-300m", 6 experts, top 2 renormalised, a dense layer by mlp_only_layers;
"qwen3moe-k1-300m", top 1 of 5 unnormalised, decoder_sparse_step 2, tied): prompt logits, 16 greedy tokens and
their step logits for text, an image and a video on the torch and cpp backends (text and video on triton, through
its interpreter); batch invariance; the original
layout and transformers' in-memory 3-D experts form load the same; the config rules, refusals and shard checks; each
rank's slice of the experts; and decode's CUDA-graph decision."""
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import LLM, SamplingParams
from internvl_engine.config import ModelConfig, TextConfig
from internvl_engine.errors import CheckpointError, ShardingError, UnsupportedModelError
from internvl_engine.loader.names import export_hf_state_dict
from internvl_engine.models.moe import MoeExperts, SparseMoeBlock, decode_graph_problem
from internvl_engine.parallel import TensorParallel, check_shardable
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits
from test_loader import _copy_side_files
from test_model_parity import ATOL, CONVERSATIONS, TRITON_IMAGE_SIZE
from test_original_layouts import write_original
from test_quant import FP8_BLOCK

VARIANTS = ("qwen3moe-300m", "qwen3moe-k1-300m")
KINDS = ("text", "one_image", "video")
BACKENDS = ("torch", "cpp")
TILES = 2  # the 700 x 300 image: 2 tiles and the thumbnail; each video frame is one tile
GREEDY = SamplingParams(max_tokens=16, return_logits=True, ignore_eos=True, max_num_tiles=TILES)
_llms: dict = {}


def _llm(path, backend="torch") -> LLM:
    """One engine per checkpoint and backend for the whole module."""
    key = (str(path), backend)
    if key not in _llms:
        _llms[key] = LLM(path, dtype="float32", device="cpu", backend=backend)
    return _llms[key]


def _text(**kw) -> TextConfig:
    return ModelConfig.from_dict({"model_type": "internvl", "vision_config": {},
                                  "text_config": {"model_type": "qwen3_moe", **kw}}).text


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_are_transformers_qwen3moeconfig():
    from transformers import Qwen3MoeConfig

    ref, t = Qwen3MoeConfig(), _text()
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "decoder_sparse_step", "max_position_embeddings", "rms_norm_eps", "vocab_size", "hidden_size",
                "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(t, key) == getattr(ref, key), key
    assert (t.rope_theta, t.tie_word_embeddings in (None, False)) == (ref.rope_parameters["rope_theta"], True)
    # a config that states only the heads gets transformers' hidden_size / heads as head_dim too
    assert _text(num_attention_heads=16).head_dim == Qwen3MoeConfig(num_attention_heads=16).hidden_size // 16
    assert t.mlp_only_layers == tuple(ref.mlp_only_layers) == ()
    # no head_dim in Qwen3MoeConfig: its attention takes hidden_size / heads, unlike dense Qwen3's default 128
    assert t.head_dim == ref.hidden_size // ref.num_attention_heads == 64
    assert (t.qk_norm, t.qkv_bias, t.o_proj_bias, t.model_type) == (True, False, False, "qwen3_moe")


def test_expert_count_in_either_spelling():
    """transformers writes num_local_experts (Qwen3MoeConfig.attribute_map), Qwen's and OpenGVLab's files
    num_experts."""
    k = dict(num_experts_per_tok=2)
    assert _text(num_local_experts=6, **k).num_experts == _text(num_experts=6, **k).num_experts == 6
    with pytest.raises(CheckpointError, match=r"text_config\.num_experts 6 differs from text_config\."
                                              r"num_local_experts 8"):
        _text(num_experts=6, num_local_experts=8, **k)


@pytest.mark.parametrize("step,only,experts", [(1, [], 4), (2, [], 4), (3, [0, 4], 4), (1, [1], 4), (2, [1], 0)])
def test_moe_layers_follow_transformers(step, only, experts):
    """Which layers are sparse: transformers' Qwen3MoeDecoderLayer decides for the same config."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock

    kw = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=8,
              moe_intermediate_size=4, num_experts=experts, num_experts_per_tok=min(2, experts) or 1,
              num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=only)
    ref = Qwen3MoeConfig(**kw)
    want = [isinstance(Qwen3MoeDecoderLayer(ref, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(6)]
    t = _text(**kw)
    assert [t.is_moe_layer(i) for i in range(6)] == want
    assert t.moe_layers == [i for i, sparse in enumerate(want) if sparse]


@pytest.mark.parametrize("kw,error,match", [
    (dict(shared_expert_intermediate_size=64), UnsupportedModelError,
     r"text_config\.shared_expert_intermediate_size 64 is not supported"),
    (dict(scoring_func="sigmoid"), UnsupportedModelError, r"text_config\.scoring_func 'sigmoid' is not supported"),
    (dict(routed_scaling_factor=2.5), UnsupportedModelError, r"text_config\.routed_scaling_factor 2\.5 is not"),
    (dict(num_experts=4, num_experts_per_tok=5), CheckpointError,
     r"text_config\.num_experts_per_tok is 5, more than the 4 experts"),
    (dict(num_hidden_layers=4, mlp_only_layers=[4]), CheckpointError,
     r"text_config\.mlp_only_layers must be a list of layer indices in \[0, 4\)"),
    (dict(decoder_sparse_step=0), CheckpointError, r"text_config\.decoder_sparse_step is 0"),
    (dict(moe_intermediate_size="768"), CheckpointError, r"text_config\.moe_intermediate_size must be an integer"),
    (dict(num_experts=10**6), CheckpointError, r"text_config\.num_experts is 1000000, over the 4096 limit"),
])
def test_moe_config_errors_name_the_field(kw, error, match):
    with pytest.raises(error, match=match):
        _text(**kw)


def test_plain_routing_keys_are_accepted():
    """Router keys other MoE families state, at the values that mean Qwen3-MoE's own routing."""
    assert _text(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                 shared_expert_intermediate_size=0, num_experts=8, num_experts_per_tok=2).num_experts == 8


@pytest.mark.parametrize("block", [{"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
                                   FP8_BLOCK])
def test_quantized_experts_are_refused(block):
    raw = {"model_type": "internvl", "vision_config": {}, "quantization_config": block,
           "text_config": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2}}
    with pytest.raises(UnsupportedModelError, match=r"quantized \((awq|fp8)\) mixture-of-experts checkpoint"):
        ModelConfig.from_dict(raw)


def test_shard_check_names_the_expert_width():
    """Each expert's width splits over the ranks; the dense intermediate_size only matters where a layer is
    dense."""
    t = TextConfig(model_type="qwen3_moe", num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=2,
                   intermediate_size=100, num_experts=4, moe_intermediate_size=36)
    check_shardable(t, 4)  # every layer sparse: intermediate_size 100 is never split
    with pytest.raises(ShardingError, match=r"tensor_parallel_size 8 does not divide moe_intermediate_size 36 "
                                            r"\(each expert's width.*fit this model: 1, 2, 4"):
        check_shardable(t, 8)
    t.mlp_only_layers = (1,)
    with pytest.raises(ShardingError, match=r"does not divide intermediate_size 100"):
        check_shardable(t, 8)


# ---------------------------------------------------------------------------------------------- parity
# the image prompt once (its 785 rows of fp32 logits over 151674 tokens dominate the time); text and video for both
@pytest.mark.parametrize("variant,kind", [(v, k) for v in VARIANTS for k in KINDS
                                          if (v, k) != ("qwen3moe-k1-300m", "one_image")])
def test_prompt_logits_and_greedy_match_transformers(hf_checkpoint, variant, kind):
    path, hf_model = hf_checkpoint(variant)
    conv = CONVERSATIONS[kind]
    inputs = hf_inputs(make_hf_processor(path), conv, TILES)
    ref = hf_logits(hf_model, inputs)
    ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 16)
    for backend in BACKENDS:
        llm = _llm(path, backend)
        assert llm.processor(conv, max_num_tiles=TILES).input_ids == inputs["input_ids"][0].tolist()
        ours = llm.prompt_logits(conv, params=GREEDY)
        assert (ours - ref).abs().max().item() <= ATOL, backend
        out = llm.generate(conv, GREEDY)[0]
        assert out.token_ids == ref_ids, backend
        assert (out.logits - ref_step_logits).abs().max().item() <= ATOL, backend


@pytest.mark.parametrize("kind", ["text", pytest.param("video", marks=pytest.mark.slow)])
def test_triton_interpreter_matches_transformers(hf_checkpoint, kind):
    """The triton backend (the grouped-GEMM fused_moe kernel, and every other kernel) through Triton's interpreter,
    on 224-pixel tiles as test_model_parity runs it (TRITON_IMAGE_SIZE: the interpreter's cost). The video case
    (~20 s on 2 cores) runs with -m slow."""
    path, hf_model = hf_checkpoint("qwen3moe-300m", image_size=TRITON_IMAGE_SIZE)
    conv = CONVERSATIONS[kind]
    inputs = hf_inputs(make_hf_processor(path), conv, TILES)
    llm = _llm(path, "triton")
    assert llm.runner.kernels["fused_moe"] == "triton"
    assert (llm.prompt_logits(conv, params=GREEDY) - hf_logits(hf_model, inputs)).abs().max().item() <= ATOL
    ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 16)
    out = llm.generate(conv, GREEDY)[0]
    assert out.token_ids == ref_ids
    assert (out.logits - ref_step_logits).abs().max().item() <= ATOL


def _record_routing(llm):
    """Per MoE layer, the topk_ids of every fused_moe call (the op table is wrapped on each sparse block)."""
    calls = {}
    for i, layer in enumerate(llm.model.language_model.layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            table, log = layer.mlp.ops, calls.setdefault(i, [])

            def fused_moe(x, w13, w2, weights, ids, table=table, log=log):
                log.append(ids.clone())
                return table.fused_moe(x, w13, w2, weights, ids)
            layer.mlp.ops = SimpleNamespace(fused_moe=fused_moe)
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_routing_reaches_every_expert_and_decode_reads_only_k(hf_checkpoint, variant):
    """The random router spreads an image prompt over every expert of every sparse layer (so parity covers each
    expert's weights), while a decode step routes its one token to k experts and leaves the others idle."""
    path, _ = hf_checkpoint(variant)
    llm = LLM(path, dtype="float32", device="cpu", backend="torch")
    t = llm.config.text
    calls = _record_routing(llm)
    hit = {layer: set() for layer in t.moe_layers}
    for kind in KINDS:
        for ids in calls.values():
            ids.clear()
        llm.generate(CONVERSATIONS[kind], SamplingParams(max_tokens=3, ignore_eos=True, max_num_tiles=TILES))
        assert sorted(calls) == t.moe_layers
        for layer, ids in calls.items():
            prefill, decode = ids[0], ids[1:]
            assert prefill.shape[1] == t.num_experts_per_tok and prefill.shape[0] > 10
            hit[layer] |= set(prefill.flatten().tolist())
            assert len(decode) == 2 and all(d.shape == (1, t.num_experts_per_tok) for d in decode)
            assert all(len(set(d.flatten().tolist())) == t.num_experts_per_tok for d in decode)
    assert all(experts == set(range(t.num_experts)) for experts in hit.values()), hit


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_matches_single_requests(hf_checkpoint, variant):
    path, _ = hf_checkpoint(variant)
    llm = _llm(path)
    batch = [CONVERSATIONS[k] for k in KINDS]
    together = llm.generate(batch, GREEDY)
    for conv, out in zip(batch, together):
        alone = llm.generate(conv, GREEDY)[0]
        assert out.token_ids == alone.token_ids
        assert (out.logits - alone.logits).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------- checkpoints
def test_original_layout_loads_the_same(hf_checkpoint, tmp_path):
    """OpenGVLab's InternVL3.5-30B-A3B layout: language_model.model.layers.N.mlp.experts.E.*_proj.weight under an
    llm_config naming Qwen3MoeForCausalLM (expert count spelled num_experts, as Qwen's configs do)."""
    path, _ = hf_checkpoint("qwen3moe-300m")
    original = write_original(path, tmp_path / "original", "qwen3")
    text = json.loads((path / "config.json").read_text())["text_config"]
    config = json.loads((original / "config.json").read_text())
    config["llm_config"].update(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=text["num_local_experts"],
        **{k: text[k] for k in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                                "decoder_sparse_step", "mlp_only_layers")})
    (original / "config.json").write_text(json.dumps(config))
    keys = load_file(str(original / "model.safetensors")).keys()
    assert "language_model.model.layers.0.mlp.experts.5.down_proj.weight" in keys
    assert "language_model.model.layers.0.mlp.gate.weight" in keys
    cfg = ModelConfig.from_pretrained(original)
    assert (cfg.source_format, cfg.text.model_type, cfg.text.moe_layers) == ("original", "qwen3_moe", [0, 2])
    for conv in (CONVERSATIONS["text"], CONVERSATIONS["one_image"]):
        params = SamplingParams(max_num_tiles=2)
        assert torch.equal(_llm(original).prompt_logits(conv, params=params),
                           _llm(path).prompt_logits(conv, params=params))


def test_fused_experts_form_and_the_export_round_trip(hf_checkpoint, tmp_path):
    """transformers' in-memory state dict (model.-prefixed, each layer's experts as one 3-D gate_up_proj /
    down_proj tensor) loads to the same logits; export_hf_state_dict gives back the per-expert files exactly."""
    path, hf_model = hf_checkpoint("qwen3moe-300m")
    fused = tmp_path / "fused"
    _copy_side_files(path, fused)
    shutil.copy(path / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    conv = CONVERSATIONS["text"]
    assert torch.equal(_llm(fused).prompt_logits(conv),
                       _llm(path).prompt_logits(conv))
    files = load_file(str(path / "model.safetensors"))
    exported = export_hf_state_dict(_llm(path).model)
    assert exported.keys() == files.keys()
    assert all(torch.equal(exported[k], files[k]) for k in files)


def test_a_missing_expert_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3moe-300m")
    broken = tmp_path / "broken"
    _copy_side_files(path, broken)
    shutil.copy(path / "config.json", broken / "config.json")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["language_model.model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors for language_model\.layers\.2\.mlp\.experts\."
                                              r"gate_up_proj\.weight \(3\.up_proj\)"):
        LLM(broken, dtype="float32", device="cpu", backend="torch")


@pytest.mark.parametrize("extra", ["language_model.model.layers.2.mlp.experts.6.up_proj.weight",
                                   "language_model.model.layers.2.mlp.experts.03.up_proj.weight",
                                   "language_model.model.layers.2.mlp.experts.gate_up_proj"])
def test_an_expert_outside_the_config_or_filled_twice_is_named(hf_checkpoint, tmp_path, extra):
    """A per-expert key past the config's 6 experts, one spelling an expert's index another way, and the 3-D form
    beside the per-expert tensors of the same layer: each a CheckpointError naming the key (not an IndexError, nor
    a tensor silently loaded over another)."""
    path, _ = hf_checkpoint("qwen3moe-300m")
    broken = tmp_path / "broken"
    _copy_side_files(path, broken)
    shutil.copy(path / "config.json", broken / "config.json")
    tensors = load_file(str(path / "model.safetensors"))
    w = tensors["language_model.model.layers.2.mlp.experts.3.up_proj.weight"]
    tensors[extra] = w.clone() if extra.endswith(".weight") else torch.cat([w, w]).expand(6, -1, -1).contiguous()
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
        LLM(broken, dtype="float32", device="cpu", backend="torch")


@pytest.mark.parametrize("n", [2, 3])
def test_each_rank_reads_its_slice_of_every_expert(n):
    """Rank r of N keeps rows [r F/N, (r+1) F/N) of each expert's gate and up and those columns of its down: what it
    reads from the per-expert tensors and from the 3-D form equals its part of the whole (from_full, which random
    weights use), and the ranks' parts put back together are the whole."""
    t = TextConfig(model_type="qwen3_moe", hidden_size=10, num_experts=3, moe_intermediate_size=12)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(3, 24, 10, generator=g), torch.randn(3, 10, 12, generator=g)
    per_expert = {f"{e}.{p}": w for e in range(3)
                  for p, w in (("gate_proj", w13[e, :12]), ("up_proj", w13[e, 12:]), ("down_proj", w2[e]))}
    parts = []
    for rank in range(n):
        experts = MoeExperts(t, TensorParallel(rank, n))
        for module, full in ((experts.gate_up_proj, w13), (experts.down_proj, w2)):
            module.weight.data.zero_()
            for shard in module.shard_names:
                target, index, shape, _ = module.load_plan("weight", shard)
                tensor = per_expert[shard]
                assert tuple(tensor.shape) == shape
                target.copy_(tensor if index is None else tensor[index])
            assert torch.equal(module.weight.data, module.from_full("weight", full))
            target, index, shape, regroup = module.load_plan("weight", None)
            read = full if index is None else full[index]
            assert shape == tuple(full.shape) and torch.equal(read if regroup is None else regroup(read), target)
        parts.append(experts)
    f = 12 // n
    gate = torch.cat([p.gate_up_proj.weight.data[:, :f] for p in parts], dim=1)
    up = torch.cat([p.gate_up_proj.weight.data[:, f:] for p in parts], dim=1)
    assert torch.equal(torch.cat([gate, up], dim=1), w13)
    assert torch.equal(torch.cat([p.down_proj.weight.data for p in parts], dim=2), w2)


# ---------------------------------------------------------------------------------------------- CUDA graphs
def test_decode_graphs_wait_for_a_graph_safe_fused_moe(hf_checkpoint, caplog):
    """The torch fused_moe reads each expert's token count on the host, which a CUDA graph cannot capture: a MoE
    model bound to it decodes eagerly (and says why); the Triton kernel sorts on the device, so its decode is
    captured. A dense model is not concerned."""
    moe, dense = _text(num_experts=4, num_experts_per_tok=2), _text(num_experts=0)
    for backend in ("torch", "cuda", "cpp"):
        assert "reads each expert's token count on the host" in decode_graph_problem(moe, {"fused_moe": backend})
        assert decode_graph_problem(dense, {"fused_moe": backend}) is None
    assert decode_graph_problem(moe, {"fused_moe": "triton"}) is None
    path, _ = hf_checkpoint("qwen3moe-300m")
    llm = LLM(path, dtype="float32", device="cpu", backend="torch")
    with caplog.at_level(logging.INFO, logger="internvl_engine.worker.runner"):
        llm.runner.enable_graphs(llm.engine.cache, 2, 4, emulate=True, vision=False)
    assert llm.runner.graphs is None
    assert "no decode CUDA graphs: fused_moe on the 'torch' backend" in caplog.text
    out = llm.generate(CONVERSATIONS["text"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == _llm(path).generate(CONVERSATIONS["text"],
                                                 SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids


# ---------------------------------------------------------------------------------------------- CUDA (gpu_check.sh)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_on_cuda_matches_transformers(hf_checkpoint, backend, dtype):
    """fp32: prompt logits within 1e-3 of transformers on the same device and the same 16 greedy tokens; bf16: the
    spec's rule (ids equal, or the first difference where transformers' own top-2 margin is tiny; test_gpu.py)."""
    from test_gpu import _check_bf16_ids, _hf_on_cuda, _to

    path, hf_model = hf_checkpoint("qwen3moe-300m")
    conv, torch_dtype = CONVERSATIONS["one_image"], getattr(torch, dtype)
    inputs = _to(hf_inputs(make_hf_processor(path), conv, TILES), torch_dtype)
    ref_model = _hf_on_cuda(hf_model, torch_dtype)
    llm = LLM(path, dtype=dtype, device="cuda", backend=backend, kv_cache_tokens=32768)
    out = llm.generate(conv, GREEDY)[0]
    ref_ids, ref_logits = hf_greedy(ref_model, inputs, 16)
    if dtype == "float32":
        ref = hf_logits(ref_model, inputs).cpu()
        assert (llm.prompt_logits(conv, params=GREEDY) - ref).abs().max().item() <= 1e-3
        assert out.token_ids == ref_ids
    else:
        _check_bf16_ids(out.token_ids, ref_ids, ref_logits)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_moe_decode_graphs_on_cuda(hf_checkpoint, backend):
    """With the Triton fused_moe (no host sync) decode replays CUDA graphs and a batch of 4 gets each request's
    tokens alone and eager; with the default (torch's fused_moe, which syncs) decode runs eagerly."""
    path, _ = hf_checkpoint("qwen3moe-300m")
    convs = [[{"role": "user", "content": f"Question {i}: tell me about dragons."}] for i in range(3)]
    convs.append(CONVERSATIONS["one_image"])
    params = SamplingParams(max_tokens=16, ignore_eos=True, max_num_tiles=TILES)
    llm = LLM(path, dtype="bfloat16", device="cuda", backend=backend, kv_cache_tokens=32768)
    if backend == "auto":
        assert llm.runner.kernels["fused_moe"] == "torch" and llm.runner.graphs is None
        return
    graphs = llm.runner.graphs
    assert graphs is not None
    together = [o.token_ids for o in llm.generate(convs, params)]
    assert graphs.replays >= 15
    assert together == [llm.generate(c, params)[0].token_ids for c in convs]
    eager = LLM(path, dtype="bfloat16", device="cuda", backend=backend, kv_cache_tokens=32768, enforce_eager=True)
    assert [o.token_ids for o in eager.generate(convs, params)] == together

