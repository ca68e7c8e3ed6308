"""Tensor parallelism on the CPU: gloo, 2 ranks (the driver in this process, one spawned worker), on tiny
checkpoints transformers wrote. fp32 prompt logits within 1e-4 of N=1 and of transformers and the same greedy
tokens, for text, images, several images and video, on both tower styles and on a model with a single KV head, and
for text and an image on a Qwen3-MoE one (each expert's width split); continuous batching, chunked prefill, prefix caching, preemption and aborts give N=1's tokens; each rank loads only
its slices of every layout; a worker that dies or raises kills the engine at once and leaves no process; sizes that
cannot shard the model raise ShardingError before anything starts; torchrun starts the same engine. Quantized
checkpoints (AWQ .bin in OpenGVLab's layout, FP8 compressed-tensors): logits within 1e-4 of N=1 (FP8: of N=1
quantizing row-parallel activations per rank slice, as the ranks do) and the same greedy tokens, each rank reads
only its slices, row-parallel layers add the bias once, and AWQ sizes that cannot split are typed errors.
Engines are shared per module (a spawn costs seconds)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import test_model_parity as parity
from hf_processor import make_hf_processor
from internvl_engine import LLM, SamplingParams
from internvl_engine.config import ModelConfig, TextConfig
from internvl_engine.parallel import TensorParallel, check_shardable
from internvl_engine.settings import EngineConfigError
from internvl_engine.engine.llm_engine import LLMEngine
from internvl_engine.errors import EngineDeadError, ShardingError
from reference import hf_greedy, hf_inputs, hf_logits
from test_engine import _drain

ATOL = 1e-4
TOKENS = 8


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _workers_gone(engine: LLMEngine) -> bool:
    return all(p.exitcode is not None and not _alive(p.pid) for p in engine.executor.procs.values())


# ---------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module", params=["300m", "6b"])
def engines(request, hf_checkpoint):
    path, hf_model = hf_checkpoint(request.param)
    one = LLM(path, dtype="float32", device="cpu")
    two = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    yield one, two, hf_model, make_hf_processor(path)
    two.engine.shutdown()
    assert _workers_gone(two.engine)


def _check_parity(one, two, hf_model, hf_proc, conv, max_tiles):
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, return_logits=True, max_num_tiles=max_tiles)
    inputs = hf_inputs(hf_proc, conv, max_tiles)
    ref = hf_logits(hf_model, inputs)
    l1, l2 = one.prompt_logits(conv, params=params), two.prompt_logits(conv, params=params)
    assert l2.shape == ref.shape
    assert (l2 - l1).abs().max().item() <= ATOL
    assert (l2 - ref).abs().max().item() <= ATOL
    o1, o2 = one.generate(conv, params)[0], two.generate(conv, params)[0]
    ref_ids, _ = hf_greedy(hf_model, inputs, TOKENS)
    assert o2.token_ids == o1.token_ids == ref_ids
    assert (o2.logits - o1.logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind", list(parity.CONVERSATIONS))
def test_logits_and_greedy_match_one_rank_and_transformers(engines, kind):
    one, two, hf_model, hf_proc = engines
    _check_parity(one, two, hf_model, hf_proc, parity.CONVERSATIONS[kind], parity.MAX_TILES)


def test_each_rank_holds_its_heads(engines):
    one, two, _, _ = engines
    t = two.config.text
    k_cache = two.runner.cache.layers[0][0]
    assert k_cache.shape[2] == t.num_key_value_heads // 2
    assert one.runner.cache.layers[0][0].shape[2] == t.num_key_value_heads
    attn = two.model.language_model.layers[0].self_attn
    assert attn.num_heads == t.num_attention_heads // 2
    assert two.model.lm_head.weight.shape[0] == -(-t.vocab_size // 2)
    assert type(one.model.lm_head) is torch.nn.Linear  # N=1: plain layers, whole
    o_proj = one.model.language_model.layers[0].self_attn.o_proj
    width = t.num_attention_heads * t.head_dim  # hidden_size in Qwen2; Llama and Qwen3 may state another head_dim
    assert o_proj.tp.size == 1 and not o_proj.row_sharded and o_proj.weight.shape == (t.hidden_size, width)
    assert two.model.language_model.layers[0].self_attn.o_proj.weight.shape == (t.hidden_size, width // 2)


# The Llama (InternLM3 as converted) and Qwen3 (InternVL3.5) decoders at N=2, one tower style each (the towers are
# not split, and the 300m / 6b pair above covers both): an explicit head_dim, q/k norms over each rank's own heads,
# Qwen3 with a tied lm_head split over the vocabulary. Text and one image: the decoders' paths (prefill, decode,
# image tokens); the other conversations exercise nothing family-specific.
@pytest.fixture(scope="module", params=["llama-300m", "qwen3-6b"])
def family_engines(request, hf_checkpoint):
    path, hf_model = hf_checkpoint(request.param)
    one = LLM(path, dtype="float32", device="cpu")
    two = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    assert two.config.text.model_type == request.param.split("-")[0]
    yield one, two, hf_model, make_hf_processor(path)
    two.engine.shutdown()
    assert _workers_gone(two.engine)


@pytest.mark.parametrize("kind", ["text", "one_image"])
def test_new_decoders_match_one_rank_and_transformers(family_engines, kind):
    _check_parity(*family_engines, parity.CONVERSATIONS[kind], parity.MAX_TILES)
    test_each_rank_holds_its_heads(family_engines)


# Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B) at N=2 (auto kernels: the C++ fused_moe on the CPU): each expert's
# width split over the ranks (gate/up rows, down columns) with one all-reduce a layer, the router whole on each rank
# so both route alike; qwen3moe-300m has a dense layer between sparse ones (mlp_only_layers), 6 experts of width 48.
@pytest.fixture(scope="module")
def moe_engines(hf_checkpoint):
    path, hf_model = hf_checkpoint("qwen3moe-300m")
    one = LLM(path, dtype="float32", device="cpu")
    two = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    yield one, two, hf_model, make_hf_processor(path)
    two.engine.shutdown()
    assert _workers_gone(two.engine)


@pytest.mark.parametrize("kind", ["text", "one_image"])
def test_moe_matches_one_rank_and_transformers(moe_engines, kind):
    _check_parity(*moe_engines, parity.CONVERSATIONS[kind], parity.MAX_TILES)


def test_moe_ranks_hold_half_of_every_expert(moe_engines):
    """The driver (rank 0) holds rows [0, 24) of each expert's gate and of its up (48 rows of the packed 96) and
    columns [0, 24) of its down; the router and the dense layer's MLP as N=1 holds them, less its split."""
    one, two, _, _ = moe_engines
    full, half = one.model.language_model.layers[0].mlp, two.model.language_model.layers[0].mlp
    assert tuple(half.experts.gate_up_proj.weight.shape) == (6, 48, 96)
    assert tuple(half.experts.down_proj.weight.shape) == (6, 96, 24)
    gate_up = full.experts.gate_up_proj.weight
    assert torch.equal(half.experts.gate_up_proj.weight, torch.cat([gate_up[:, :24], gate_up[:, 48:72]], 1))
    assert torch.equal(half.experts.down_proj.weight, full.experts.down_proj.weight[:, :, :24])
    assert torch.equal(half.gate.weight, full.gate.weight)


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    """The 300m-style tiny model with 6 query heads over a single KV head: under N=2 each rank keeps that head."""
    import checkpoints
    base = checkpoints.VARIANTS["300m"]
    checkpoints.VARIANTS.setdefault("tp-kv1", dict(vision=base["vision"],
                                                   text={**base["text"], "num_key_value_heads": 1}))
    path = tmp_path_factory.mktemp("hf-tp-kv1")
    hf_model = checkpoints.build_hf_checkpoint(path, "tp-kv1")
    one = LLM(path, dtype="float32", device="cpu")
    two = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    yield one, two, hf_model, make_hf_processor(path)
    two.engine.shutdown()


@pytest.mark.parametrize("kind", ["text", "one_image"])
def test_single_kv_head_is_replicated(one_kv_head, kind):
    one, two, hf_model, hf_proc = one_kv_head
    assert two.runner.cache.layers[0][0].shape[2] == 1
    assert two.model.language_model.layers[0].self_attn.num_heads == 3
    _check_parity(one, two, hf_model, hf_proc, parity.CONVERSATIONS[kind], 2)


# ---------------------------------------------------------------------------------------------- scheduling
def _params(n):
    return SamplingParams(max_tokens=n, ignore_eos=True, max_num_tiles=1)


def _text(i):
    return [{"role": "user", "content": f"Tell me story number {i} about a dragon and a knight."}]


def _picture(i):
    return [{"role": "user", "content": [{"type": "image", "image": parity._image(90 + i, 80, 100 + i)},
                                         {"type": "text", "text": f"Describe picture {i}."}]}]


@pytest.fixture(scope="module")
def sched(hf_checkpoint):
    """(N=1 reference engine, caches off; N=2 engine with a small KV pool and chunked prefill)."""
    path = hf_checkpoint("300m")[0]
    ref = LLMEngine(path, dtype="float32", device="cpu", enable_prefix_caching=False, vision_cache_bytes=0)
    two = LLMEngine(path, dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_tokens=480,
                    max_num_batched_tokens=128)
    alone = {}

    def reference(conv, n, key):
        if key not in alone:
            ref.add_request(key, conv, _params(n))
            alone[key] = _drain(ref)[key].token_ids
        return alone[key]

    yield two, reference
    two.shutdown()


def test_batching_preemption_and_chunked_prefill_match_one_rank(sched):
    two, reference = sched
    n = 24
    convs = [_text(i) for i in range(6)] + [_picture(0), _picture(1)]
    for i, conv in enumerate(convs):
        two.add_request(f"b{i}", conv, _params(n))
    final = _drain(two)
    assert two.stats().num_preemptions > 0
    assert [final[f"b{i}"].token_ids for i in range(8)] == [reference(c, n, f"r{i}") for i, c in enumerate(convs)]
    assert two.block_manager.num_free_blocks == two.block_manager.num_blocks


def test_prefix_caching_and_aborts_match_one_rank(sched):
    two, reference = sched
    for rid in ("first", "again"):
        two.add_request(rid, _picture(1), _params(6))
        out = _drain(two)[rid]
        assert out.token_ids == reference(_picture(1), 6, "p1")
    assert out.metrics.cached_prompt_tokens > 0 and out.metrics.cached_images == 1
    for i in range(3):
        two.add_request(f"a{i}", _text(10 + i), _params(12))
    for _ in range(3):
        two.step()
    assert two.abort("a1")
    final = _drain(two)
    assert final["a1"].finish_reason == "abort"
    for i in (0, 2):
        assert final[f"a{i}"].token_ids == reference(_text(10 + i), 12, f"t{10 + i}")
    assert two.block_manager.num_free_blocks == two.block_manager.num_blocks


# ---------------------------------------------------------------------------------------------- failure
def test_killed_worker_kills_the_engine_within_seconds():
    llm = LLM("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2)
    engine = llm.engine
    pid = engine.executor.procs[1].pid
    errors = []

    def generate():
        try:
            llm.generate(_text(0), SamplingParams(max_tokens=10_000, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not any(len(s.output_ids) > 3 for s in list(engine._requests.values())):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    # a hang guard, far below the 300 s tensor_parallel_timeout_s a driver that missed the death would wait out
    thread.join(120)
    assert not thread.is_alive(), "generate() hangs after its worker died"
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError), errors
    with pytest.raises(EngineDeadError, match="rank 1.*SIGKILL"):
        engine.check_health()
    with pytest.raises(EngineDeadError):
        llm.generate(_text(1), _params(2))
    engine.shutdown()
    assert _workers_gone(engine)


def test_a_sampler_failure_is_its_requests_not_the_ranks():
    """The driver samples after the parallel forward: a sampler failure fails its request alone (the step is rerun
    in halves, as with one rank) and leaves the workers serving; inside the parallel call it killed the engine."""
    llm = LLM("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        local = llm.engine.runner.local
        real = local.sampler

        def sampler(logits, rows):
            if 0.5 in rows.temperature:
                raise RuntimeError("planted sampler failure")
            return real(logits, rows)

        local.sampler = sampler
        outs = llm.generate([_text(0), _text(1)], [SamplingParams(max_tokens=4, temperature=0.5, seed=1),
                                                   _params(4)])
        assert outs[0].finish_reason == "error" and "planted sampler failure" in str(outs[0].error)
        assert outs[1].finish_reason == "length"
        llm.engine.check_health()
        assert len(llm.generate(_text(2), _params(3))[0].token_ids) == 3
    finally:
        llm.shutdown()
    assert _workers_gone(llm.engine)


def test_raising_worker_kills_the_engine_and_fails_pending_requests():
    """AsyncLLM over an N=2 engine: a worker that raises mid-step fails every request in flight with
    EngineDeadError naming what it raised, and stops the workers."""
    from internvl_engine.engine.async_llm import AsyncLLM
    llm = AsyncLLM("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2)
    assert len(llm.submit(_text(0), _params(3)).result(timeout=60).token_ids) == 3
    with llm.engine._lock:  # between steps of the loop thread: both requests are in before the next step
        llm.engine.executor.inject_fault()
        futures = [llm.submit(_text(i), _params(50)) for i in range(2)]
    for f in futures:  # a hang guard, far below the 300 s tensor_parallel_timeout_s
        with pytest.raises(EngineDeadError, match="injected worker fault on rank 1"):
            f.result(timeout=120)
    assert _workers_gone(llm.engine)  # a dead engine stops its workers at once
    with pytest.raises(EngineDeadError):
        llm.check_health()
    with pytest.raises(EngineDeadError):
        llm.submit(_text(0), _params(3))
    llm.shutdown()
    llm.engine.shutdown()


def test_sizes_that_cannot_shard_raise_before_anything_starts(hf_checkpoint):
    import multiprocessing
    path = hf_checkpoint("300m")[0]  # 6 heads, 2 KV heads, intermediate 160
    before = set(multiprocessing.active_children())
    with pytest.raises(ShardingError, match=r"num_attention_heads 6.*% 4 = 2"):
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=4)
    with pytest.raises(ShardingError, match=r"num_key_value_heads 2.*3"):
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=3)
    assert set(multiprocessing.active_children()) == before
    with pytest.raises(ShardingError, match=r"intermediate_size 150.*% 4 = 2"):
        check_shardable(TextConfig(num_attention_heads=8, num_key_value_heads=2, intermediate_size=150), 4)
    check_shardable(TextConfig(num_attention_heads=8, num_key_value_heads=1, intermediate_size=160), 4)
    with pytest.raises(EngineConfigError, match="tensor_parallel_size"):
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=0)


# ---------------------------------------------------------------------------------------------- loading
def _full_model_and_reads(path, monkeypatch):
    """(torch ops, cpu, the checkpoint's config, the N=1 model's parameters, the list of (key, index) that every
    checkpoint read from here on appends to)."""
    from internvl_engine.loader import checkpoint as loader  # _read, patched below, lives there
    from internvl_engine.ops import OpTable

    ops, cpu = OpTable.resolve("torch", "cpu"), torch.device("cpu")
    config = ModelConfig.from_pretrained(path)
    full = dict(loader.load_model(config, path, ops, cpu, torch.float32).named_parameters())
    reads = []
    real_read = loader._read
    monkeypatch.setattr(loader, "_read", lambda f, key, index, shape, file: (reads.append((key, index)),
                                                                              real_read(f, key, index, shape, file))[1])
    return ops, cpu, config, full, reads


def _layouts(path, tmp_path):
    """The checkpoint in the -hf, model.-prefixed, original and sharded layouts (test_loader's conversions)."""
    import shutil

    from safetensors.torch import load_file, save_file

    import test_loader
    files = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    out = {"hf": path}
    prefixed = tmp_path / "prefixed"
    test_loader._copy_side_files(path, prefixed)
    shutil.copy(path / "config.json", prefixed / "config.json")
    renamed = {}
    for k, v in files.items():
        if k.startswith("language_model.lm_head."):
            renamed["lm_head." + k[len("language_model.lm_head."):]] = v
        elif k.startswith("language_model.model."):
            renamed["model.language_model." + k[len("language_model.model."):]] = v
        else:
            renamed["model." + k] = v
    save_file(renamed, str(prefixed / "model.safetensors"))
    out["prefixed"] = prefixed
    original = tmp_path / "original"
    test_loader._copy_side_files(path, original)
    tensors, orig_config = test_loader.to_original(files, config)
    save_file(tensors, str(original / "model.safetensors"))
    (original / "config.json").write_text(json.dumps(orig_config))
    out["original"] = original
    sharded = tmp_path / "sharded"
    test_loader._copy_side_files(path, sharded)
    shutil.copy(path / "config.json", sharded / "config.json")
    keys, weight_map = sorted(files), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: files[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out["sharded"] = sharded
    return out


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_each_rank_reads_only_its_slices_in_every_layout(hf_checkpoint, tmp_path, monkeypatch, variant):
    """No process group needed: a rank's model is built and loaded as rank r of 2, and every parameter equals its
    slice of the N=1 model's; sharded parameters are read through get_slice, never whole."""
    from internvl_engine import loader

    path = hf_checkpoint(variant)[0]
    ops, cpu, config, full, reads = _full_model_and_reads(path, monkeypatch)
    sharded_keys = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                    "lm_head")
    for layout, where in _layouts(path, tmp_path).items():
        for rank in (0, 1):
            reads.clear()
            model = loader.load_model(config, where, ops, cpu, torch.float32, tp=TensorParallel(rank, 2))
            for name, p in model.named_parameters():
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                want = module.from_full(leaf, full[name]) if hasattr(module, "from_full") else full[name]
                assert torch.equal(p, want), (layout, rank, name)
            whole = [k for k, index in reads if index is None and "language_model" in k and
                     any(s in k for s in sharded_keys)]
            assert not whole, (layout, rank, whole[:3])


# ---------------------------------------------------------------------------------------------- torchrun
TORCHRUN_SCRIPT = """
import json
from internvl_engine import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2)  # rank 1 serves here
    out = llm.generate("Tell me story number 0 about a dragon and a knight.",
                       SamplingParams(max_tokens=8, ignore_eos=True))[0]
    print("TOKENS", json.dumps(out.token_ids), flush=True)
    llm.engine.shutdown()
"""


def test_torchrun_ranks_serve_the_same_engine(tmp_path):
    script = tmp_path / "tp_run.py"
    script.write_text(TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1  # rank 1 never returned from LLM(): it served rank 0's steps, then exited
    one = LLM("random:tiny", dtype="float32", device="cpu")
    ref = one.generate("Tell me story number 0 about a dragon and a knight.", _params(8))[0].token_ids
    assert json.loads(lines[0].split(" ", 1)[1]) == ref


# ---------------------------------------------------------------------------------------------- quantized
# AWQ at N=2 splits o_proj's and down_proj's inputs into whole groups of 128 rows per rank: hidden 256 and
# intermediate 512 (test_quant's "quant" variant, hidden 128, cannot: 64 rows per rank; see test_quant).
QUANT_TEXT = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, tie_word_embeddings=False)


def _write_quantized(dense_path, method, path, layout="hf"):
    """layout "hf": safetensors, block at the top level; "bin": OpenGVLab's AWQ shipping form (original layout,
    pickle .bin shards, block under llm_config; test_quant's writer)."""
    from safetensors.torch import save_file

    import test_loader
    import test_quant as tq
    tensors, block = tq.quantized_files(dense_path, method)
    if layout == "bin":
        return tq._write_awq_bin(dense_path, tensors, path)
    test_loader._copy_side_files(dense_path, path)
    config = json.loads((dense_path / "config.json").read_text())
    config["quantization_config"] = block
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# The Llama and Qwen3 decoders quantized: head_dim 128 (twice hidden / heads), so each rank's o_proj keeps
# 2 heads x 128 = 256 input rows, two whole AWQ groups; Qwen3 tied.
QUANT_TEXT_FAMILIES = {
    "llama": dict(QUANT_TEXT, model_type="llama", head_dim=128),
    "qwen3": dict(QUANT_TEXT, model_type="qwen3", head_dim=128, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def _build_quant_dense(tmp_path_factory, family):
    import checkpoints
    variant = "quant-tp" + ("" if family == "qwen2" else f"-{family}")
    text = QUANT_TEXT if family == "qwen2" else QUANT_TEXT_FAMILIES[family]
    checkpoints.VARIANTS.setdefault(variant, dict(vision=checkpoints.VARIANTS["300m"]["vision"], text=text))
    path = tmp_path_factory.mktemp(f"{variant}-dense")
    checkpoints.build_hf_checkpoint(path, variant, seed=1)
    return path


@pytest.fixture(scope="module")
def quant_dense(tmp_path_factory):
    return _build_quant_dense(tmp_path_factory, "qwen2")


def _fp8_per_rank_reference(llm, n=2):
    """Make an N=1 engine compute what FP8 at N ranks computes: each row-parallel layer (o_proj, down_proj) splits
    its input features into n slices, quantizes each slice's activations per token with its own scale (as each
    rank does, quant/fp8.py Fp8LinearMethod.apply) and sums the n products. The column-parallel layers see the
    whole input on every rank, so they already quantize as N=1 does."""
    import types

    from internvl_engine.quant.fp8 import Fp8LinearMethod

    def forward(m, x):
        k, x2 = m.in_local // n, x.reshape(-1, m.in_local)
        y = sum(m.ops.fp8_gemm(x2[:, r * k:(r + 1) * k].contiguous(), m.weight[:, r * k:(r + 1) * k].contiguous(),
                                  m.weight_scale) for r in range(n))
        y = y.reshape(*x.shape[:-1], m.out_features)
        return y if m.bias is None else y + m.bias

    patched = 0
    for layer in llm.model.language_model.layers:
        for m in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if isinstance(m.quant_method, Fp8LinearMethod):
                m.forward = types.MethodType(forward, m)
                patched += 1
    return patched


@pytest.fixture(scope="module", params=[("awq", "qwen2"), ("fp8", "qwen2"), ("awq", "llama"), ("fp8", "qwen3")],
                ids=lambda p: "-".join(p))
def quant_engines(request, tmp_path_factory):
    """(method, N=1 engine, N=2 engine) on the quantized checkpoint: AWQ in OpenGVLab's shipping form (original
    layout, .bin shards; the Llama decoder's in the -hf layout), FP8 as compressed-tensors safetensors (its ignore
    list leaves layer 1's down_proj dense). FP8's N=1 engine quantizes the row-parallel layers' activations per
    rank slice (see above). Each new decoder family with one format: the formats' split is the family's layers'."""
    method, family = request.param
    dense = (request.getfixturevalue("quant_dense") if family == "qwen2"
             else _build_quant_dense(tmp_path_factory, family))
    path = _write_quantized(dense, method, tmp_path_factory.mktemp(f"quant-tp-{method}-{family}"),
                            "bin" if (method, family) == ("awq", "qwen2") else "hf")
    one = LLM(path, dtype="float32", device="cpu")
    if method == "fp8":
        assert _fp8_per_rank_reference(one) == 3  # o_proj x2, down_proj of layer 0 (layer 1's is dense)
    two = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    yield method, one, two
    two.engine.shutdown()
    assert _workers_gone(two.engine)


@pytest.mark.parametrize("kind", ["text", "one_image"])
def test_quantized_logits_and_greedy_match_one_rank(quant_engines, kind):
    method, one, two = quant_engines
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, return_logits=True, max_num_tiles=2)
    conv = parity.CONVERSATIONS[kind]
    l1, l2 = one.prompt_logits(conv, params=params), two.prompt_logits(conv, params=params)
    assert l2.shape == l1.shape
    assert (l2 - l1).abs().max().item() <= ATOL
    o1, o2 = one.generate(conv, params)[0], two.generate(conv, params)[0]
    assert o2.token_ids == o1.token_ids
    assert (o2.logits - o1.logits).abs().max().item() <= ATOL


def test_quantized_layers_hold_their_slices(quant_engines):
    from internvl_engine.layers.linear import DENSE, QKVParallelLinear, RowParallelLinear
    from internvl_engine.quant.awq import AWQLinearMethod
    from internvl_engine.quant.fp8 import Fp8LinearMethod

    method, one, two = quant_engines
    layers = two.model.language_model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    # Qwen2: hidden 256 = 4 heads x 64, 2 KV heads, intermediate 512: per rank q 128, k/v 64, gate/up 256 columns
    # and o_proj 128, down_proj 256 input rows. Llama / Qwen3 at head_dim 128: q 256, k/v 128, o_proj 256 rows.
    t = two.config.text
    h, q, kv, f = t.hidden_size, t.num_attention_heads // 2 * t.head_dim, t.num_key_value_heads // 2 * t.head_dim, \
        t.intermediate_size // 2
    assert (h, f) == (256, 256) and (q, kv) == ((128, 64) if t.model_type == "qwen2" else (256, 128))
    assert attn.qkv_proj.shard_sizes == [q, kv, kv] and mlp.gate_up_proj.shard_sizes == [f, f]
    # the layers are the dense model's, column- and row-parallel; the checkpoint's format is their method
    assert type(attn.qkv_proj) is QKVParallelLinear and type(attn.o_proj) is RowParallelLinear
    assert attn.qkv_proj.column_sharded and attn.o_proj.row_sharded and attn.o_proj.tp.size == 2
    format_method = AWQLinearMethod if method == "awq" else Fp8LinearMethod
    assert all(type(m.quant_method) is format_method for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                               mlp.down_proj, layers[1].self_attn.o_proj))
    qkv = q + 2 * kv
    if method == "awq":  # 8 columns an int32, one row of zeros / scales per 128 inputs
        assert attn.qkv_proj.qweight.shape == (h, qkv // 8) and attn.qkv_proj.scales.shape == (h // 128, qkv)
        assert attn.o_proj.qweight.shape == (q, h // 8) and attn.o_proj.qzeros.shape == (q // 128, h // 8)
        assert mlp.down_proj.qweight.shape == (f, h // 8) and mlp.down_proj.scales.shape == (f // 128, h)
    else:
        assert attn.qkv_proj.weight.shape == (qkv, h) and attn.qkv_proj.weight_scale.shape == (qkv, 1)
        assert attn.o_proj.weight.shape == (h, q) and attn.o_proj.weight_scale.shape == (h, 1)
        assert layers[1].mlp.down_proj.quant_method is DENSE  # in the ignore list: dense
        assert layers[1].mlp.down_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("method,layout", [("awq", "hf"), ("awq", "bin"), ("fp8", "hf")])
def test_each_rank_reads_only_its_quantized_slices(quant_dense, tmp_path, monkeypatch, method, layout):
    """As for dense checkpoints: rank r of 2's parameters equal from_full(leaf, the N=1 parameter) (at N=1 a
    quantized layer holds the whole checkpoint tensors, packed), and sharded tensors are read through get_slice.
    Only FP8's weight_scale of o_proj / down_proj is read whole (one scale per output row: every rank needs all)."""
    from internvl_engine import loader

    path = _write_quantized(quant_dense, method, tmp_path / f"{method}-{layout}", layout)
    ops, cpu, config, full, reads = _full_model_and_reads(path, monkeypatch)
    sharded = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for rank in (0, 1):
        reads.clear()
        model = loader.load_model(config, path, ops, cpu, torch.float32, tp=TensorParallel(rank, 2))
        checked = 0
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            want = module.from_full(leaf, full[name]) if hasattr(module, "from_full") else full[name]
            assert p.dtype == want.dtype and torch.equal(p, want), (rank, name)
            checked += leaf in ("qweight", "qzeros", "scales", "weight_scale")
        assert checked == (2 * 4 * 3 if method == "awq" else 2 * 4 - 1)  # 2 layers x 4 matmuls; FP8 ignores one
        whole = [k for k, index in reads if index is None and "language_model" in k
                 and any(f".{s}." in k for s in sharded)
                 and not (k.endswith(".weight_scale") and ("o_proj" in k or "down_proj" in k))]
        assert not whole, (rank, whole[:3])


def test_quantized_sizes_that_cannot_split_are_typed_errors():
    """AWQ: a rank keeps whole groups of 128 input rows of o_proj / down_proj and whole packs of 8 output columns;
    the error names the layer, its size, the size per rank and the tensor_parallel_size values that fit."""
    from internvl_engine.config.quant import QuantConfig
    from internvl_engine.errors import UnsupportedModelError
    from internvl_engine.layers.linear import PackedLinear
    from internvl_engine.quant import check_tensor_parallel, tensor_parallel_sizes
    from internvl_engine.quant.awq import AWQLinearMethod
    from internvl_engine.config import preset_config

    awq, fp8 = QuantConfig("awq"), QuantConfig("fp8", 8, 0)
    text = {name: ModelConfig.from_dict(preset_config(name)).text
            for name in ("internvl3-1b", "internvl3-2b", "internvl3-8b", "internvl3-14b", "internvl3-38b",
                         "internvl3-78b")}
    with pytest.raises(UnsupportedModelError, match=r"tensor_parallel_size 2: AWQ self_attn\.o_proj .* input size "
                                                    r"896, 448 per rank, not a multiple of the group size 128.*fit "
                                                    r"this checkpoint: 1$"):
        check_tensor_parallel(text["internvl3-1b"], awq, 2)
    with pytest.raises(UnsupportedModelError, match=r"mlp\.down_proj .* input size 29568, 14784 per rank"):
        check_tensor_parallel(text["internvl3-78b"], awq, 2)
    check_tensor_parallel(text["internvl3-1b"], fp8, 2)  # FP8 splits wherever the dense model does
    sizes = {name: tensor_parallel_sizes(t, awq) for name, t in text.items()}
    assert sizes == {"internvl3-1b": [1], "internvl3-2b": [1, 2], "internvl3-8b": [1, 2, 4],
                     "internvl3-14b": [1, 2, 4], "internvl3-38b": [1, 2, 4, 8], "internvl3-78b": [1]}
    assert tensor_parallel_sizes(text["internvl3-78b"], fp8) == [1, 2, 4, 8, 16, 32, 64]
    # the layers' own guard (AWQ's method checks the shard as the layer is built): a rank's columns of a packed
    # AWQ layer must be whole packs of 8
    with pytest.raises(UnsupportedModelError, match=r"layer 0 mlp: gate_proj keeps output columns \[0, 132\) of "
                                                    r"256 on this rank: 132 is not a multiple of 8"), torch.device("meta"):
        PackedLinear(256, [256, 256], ["gate_proj", "up_proj"], False, local=[(0, 132), (0, 132)],
                     method=AWQLinearMethod(), prefix="layer 0 mlp")


def test_shard_checks_on_the_new_decoders_name_the_sizes_that_fit():
    """InternLM3 (InternVL3-9B: 32 heads, 2 KV heads) and Qwen3 (InternVL3.5: head_dim 128, so o_proj's input is
    heads x 128, not hidden): the sizes each can use, dense and AWQ (o_proj / down_proj keep whole groups of 128
    input rows per rank), worked out by hand from the presets' shapes."""
    from internvl_engine.config.quant import QuantConfig
    from internvl_engine.quant import tensor_parallel_sizes
    from internvl_engine.config import preset_config

    text = {name: ModelConfig.from_dict(preset_config(name)).text
            for name in ("internvl3-9b", "internvl3_5-1b", "internvl3_5-4b", "internvl3_5-14b", "internvl3_5-38b")}
    with pytest.raises(ShardingError, match=r"num_attention_heads 32 .*% 3 = 2\); tensor_parallel_size that fit "
                                            r"this model: 1, 2, 4, 8, 16, 32$"):
        check_shardable(text["internvl3-9b"], 3)
    with pytest.raises(ShardingError, match=r"num_key_value_heads 8.*fit this model: 1, 2, 4, 8$"):
        check_shardable(text["internvl3_5-14b"], 5)  # 40 heads: 5, 10, 20 split the heads but not the 8 KV heads
    awq = QuantConfig("awq")
    assert {name: tensor_parallel_sizes(t, awq) for name, t in text.items()} == {
        "internvl3-9b": [1, 2, 4, 8, 16],  # down_proj: 10240 / 32 = 320 rows
        "internvl3_5-1b": [1, 2, 4, 8],  # o_proj 16 x 128 = 2048 inputs (hidden is 1024); down_proj 3072 / 16 = 192
        "internvl3_5-4b": [1, 2, 4],  # down_proj 9728 / 8 = 1216
        "internvl3_5-14b": [1, 2, 4, 8],
        "internvl3_5-38b": [1, 2, 4, 8]}  # down_proj 25600 / 16 = 1600


class _RankOfTwo(TensorParallel):
    """Rank r of 2's split, without a process group: all_reduce leaves each rank's partial product alone, and the
    test sums the ranks' outputs itself."""

    def __init__(self, rank):
        super().__init__(rank, 2)

    def all_reduce(self, x):
        return x


def test_row_parallel_layers_sum_partials_and_add_the_bias_once():
    """RowParallelLinear with the dense, AWQ and FP8 methods: all_reduce(partial) + bias. With an identity
    all_reduce, rank r returns partial_r + bias, so the N=1 product is out_0 + out_1 - bias (a bias inside the
    partial products would count twice). Each rank's parameters come from the full tensors via from_full."""
    import test_quant as tq
    from internvl_engine.layers.linear import DENSE, RowParallelLinear
    from internvl_engine.quant.awq import AWQLinearMethod
    from internvl_engine.quant.fp8 import Fp8LinearMethod

    torch.manual_seed(0)
    x, bias = torch.randn(3, 256), 0.1 * torch.randn(64)
    w = (torch.randn(64, 256) / 16).half()
    qw, qz, s, w_awq = tq.quantize_awq(w)
    q8, s8, _ = tq.quantize_fp8(w)
    cases = [(DENSE, {"weight": w.float(), "bias": bias}),
             (AWQLinearMethod(), {"qweight": qw, "qzeros": qz, "scales": s.float(), "bias": bias}),
             (Fp8LinearMethod(), {"weight": q8, "weight_scale": s8.float(), "bias": bias})]
    wholes = []
    with torch.no_grad():
        for method, tensors in cases:
            whole = RowParallelLinear(256, 64, True, TensorParallel.single(), method)  # N=1: the plain product
            for leaf, t in tensors.items():
                getattr(whole, leaf).copy_(t)
            outs = []
            for r in (0, 1):
                layer = RowParallelLinear(256, 64, True, _RankOfTwo(r), method)
                for leaf, t in tensors.items():
                    getattr(layer, leaf).copy_(layer.from_full(leaf, t))
                outs.append(layer(x[:, 128 * r:128 * (r + 1)]))
            if isinstance(method, Fp8LinearMethod):  # each rank quantizes its half of x with its own per-token scale
                want = sum(tq.fp8_gemm_ref(x[:, 128 * r:128 * (r + 1)], q8[:, 128 * r:128 * (r + 1)], s8)
                           for r in (0, 1)) + bias
            else:
                want = whole(x)
            assert torch.allclose(outs[0] + outs[1] - bias, want, atol=1e-5, rtol=0), type(method).__name__
            wholes.append(whole)
        assert torch.equal(wholes[0](x), torch.nn.functional.linear(x, w.float(), bias))  # as nn.Linear computes it
        assert torch.allclose(x @ w_awq.t() + bias, wholes[1](x), atol=1e-5)  # the AWQ layer is the dense twin's
