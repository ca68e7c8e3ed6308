"""Tensor parallelism on the CPU: gloo, 2 ranks (the driver in this process, one spawned worker), on tiny
checkpoints transformers wrote. fp32 prompt logits within 1e-4 of N=1 and of transformers and the same greedy
tokens, for text, images, several images and video, on both tower styles and on a model with a single KV head;
continuous batching, chunked prefill, prefix caching, preemption and aborts give N=1's tokens; each rank loads only
its slices of every layout; a worker that dies or raises kills the engine at once and leaves no process; sizes that
cannot shard the model raise ShardingError before anything starts; torchrun starts the same engine.
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
from internvl_engine.distributed import TensorParallel, check_shardable
from internvl_engine.engine.config import EngineConfigError
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
    assert type(one.model.lm_head) is torch.nn.Linear  # N=1: plain layers
    assert type(one.model.language_model.layers[0].self_attn.o_proj) is torch.nn.Linear


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
    assert two.num_preemptions > 0
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
    deadline = time.monotonic() + 30
    while not any(len(s.output_ids) > 3 for s in list(engine._requests.values())):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    thread.join(10)
    assert not thread.is_alive(), "generate() hangs after its worker died"
    assert time.monotonic() - t0 < 5
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError), errors
    with pytest.raises(EngineDeadError, match="rank 1.*SIGKILL"):
        engine.check_health()
    with pytest.raises(EngineDeadError):
        llm.generate(_text(1), _params(2))
    engine.shutdown()
    assert _workers_gone(engine)


def test_raising_worker_kills_the_engine_and_fails_pending_requests():
    """AsyncLLM over an N=2 engine: a worker that raises mid-step fails every request in flight with
    EngineDeadError naming what it raised, and stops the workers."""
    from internvl_engine.engine.async_llm import AsyncLLM
    llm = AsyncLLM("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2)
    assert len(llm.submit(_text(0), _params(3)).result(timeout=60).token_ids) == 3
    with llm.engine._lock:  # between steps of the loop thread: both requests are in before the next step
        llm.engine.executor.inject_fault()
        t0 = time.monotonic()
        futures = [llm.submit(_text(i), _params(50)) for i in range(2)]
    for f in futures:
        with pytest.raises(EngineDeadError, match="injected worker fault on rank 1"):
            f.result(timeout=10)
    assert time.monotonic() - t0 < 5
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
    from internvl_engine.ops import OpTable

    path = hf_checkpoint(variant)[0]
    ops, cpu = OpTable.resolve("torch", "cpu"), torch.device("cpu")
    config = ModelConfig.from_pretrained(path)
    full = dict(loader.load_model(config, path, ops, cpu, torch.float32).named_parameters())
    reads = []
    real_read = loader._read
    monkeypatch.setattr(loader, "_read", lambda f, key, index, shape, file: (reads.append((key, index)),
                                                                              real_read(f, key, index, shape, file))[1])
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
