"""The fused decode path (issue 3.6): its four ops against their oracles on odd shapes (every backend; Triton under
the interpreter), their typed errors, and the path itself: greedy tokens of decode_path="fused" equal the default
path's on an InternVL3-1B-shaped decoder (896 wide, 14 / 2 heads of 64, 4864 MLP; 2 layers and a 1024-token
vocabulary) and a Qwen3 one (q/k norm, head_dim 128), on the torch and triton backends, at batch 1 and 5, eagerly and
through emulated decode graphs; and the op calls per decoder layer, counted."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from internvl_engine import LLM, SamplingParams, ops
from internvl_engine.config import ModelConfig
from internvl_engine.config.presets import preset_config
from internvl_engine.errors import KernelInputError
from internvl_engine.layers.rotary import RotaryEmbedding
from internvl_engine.loader import init_random_
from internvl_engine.models.internvl import InternVLForConditionalGeneration
from internvl_engine.worker.runner import ModelRunner
from internvl_engine.worker.step_input import StepInput
from kernel_cases import BACKENDS, assert_close, backend, compile_for_sm90
from test_paged_attention import _cache as paged_cache

CPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cpu"]
BS = 16  # KV block size


# ------------------------------------------------------------------------------------------------ the ops
def _qkv_inputs(b, c, h, hk, d, bias, qk_norm, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    n = (h + 2 * hk) * d
    slots = torch.randperm(4 * BS, generator=g)[:b]
    slots[b // 2] = -1  # a padding row: its k and v must not be written
    return dict(x=rnd(b, c, scale=2.0), norm_weight=1 + rnd(c, scale=0.1), eps=1e-6,
                qkv_weight=rnd(n, c, scale=c ** -0.5),
                qkv_bias=rnd(n, scale=0.1) if bias else None,
                q_norm_weight=1 + rnd(d, scale=0.1) if qk_norm else None,
                k_norm_weight=1 + rnd(d, scale=0.1) if qk_norm else None,
                positions=torch.randint(0, 500, (b,), generator=g), cos_sin=RotaryEmbedding(d, 1e6, 512).table("cpu"),
                k_cache=rnd(4, BS, hk, d), v_cache=rnd(4, BS, hk, d), slot_mapping=slots)


def _on(args, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,c,h,hk,d,bias,qk_norm", [
    (1, 896, 14, 2, 64, True, False),     # InternVL3-1B's attention
    (3, 200, 6, 2, 128, False, True),     # Qwen3-style: q/k norm, head_dim 128, a width no block divides
    (8, 130, 4, 4, 24, True, True),       # MHA, a head dim that is no power of two
    (11, 96, 4, 2, 32, False, False),     # more rows than the path takes: several batch tiles, the last one partial
])
def test_decode_qkv(backend_name, device, dtype, b, c, h, hk, d, bias, qk_norm):
    args = _on(_qkv_inputs(b, c, h, hk, d, bias, qk_norm, dtype), device)
    ref_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    q_ref = ops.decode_qkv_ref(**ref_args)
    x0 = args["x"].clone()
    with backend(backend_name, device):
        q = ops.decode_qkv(**args)
    assert q.shape == (b, h, d)
    assert_close(q, q_ref, dtype)
    assert_close(args["k_cache"], ref_args["k_cache"], dtype)
    assert_close(args["v_cache"], ref_args["v_cache"], dtype)
    assert torch.equal(args["x"], x0), "x must not be modified"
    untouched = torch.ones(4 * BS, dtype=torch.bool)
    untouched[args["slot_mapping"][args["slot_mapping"] >= 0].cpu()] = False
    untouched = untouched.to(device)
    start = _on(_qkv_inputs(b, c, h, hk, d, bias, qk_norm, dtype), device)
    for name in ("k_cache", "v_cache"):  # bit-exact where nothing is written, the skipped row's slot included
        assert torch.equal(args[name].flatten(0, 1)[untouched], start[name].flatten(0, 1)[untouched])


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k,n,bias", [(1, 896, 896, True), (3, 4864, 200, False), (8, 70, 130, True),
                                        (20, 64, 48, False)])
def test_decode_gemv_residual(backend_name, device, dtype, b, k, n, bias):
    g = torch.Generator().manual_seed(b * k + n)
    x = torch.randn(b, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype).to(device)
    bb = (0.1 * torch.randn(n, generator=g)).to(dtype).to(device) if bias else None
    r = (3 * torch.randn(b, n, generator=g)).to(dtype).to(device)
    with backend(backend_name, device):
        y = ops.decode_gemv_residual(x, w, bb, r)
    assert_close(y, ops.decode_gemv_residual_ref(x, w, bb, r), dtype)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,hk,d,c,block_size,lens,bias", [
    (1, 14, 2, 64, 896, 16, [37], True),                     # InternVL3-1B's attention (GQA 7), o_proj 896 wide
    (3, 4, 2, 128, 200, 16, [1, 17, 40], False),             # a length-1 sequence, lengths crossing block edges
    (8, 3, 3, 24, 70, 32, [5, 33, 64, 1, 90, 31, 32, 7], True),  # MHA, head dim 24, block size 32
])
def test_decode_attention_o(backend_name, device, dtype, b, h, hk, d, c, block_size, lens, bias):
    """Partials [G, B, C] whose fp32 sum in head order is o_proj(paged attention): G = H fp32 partials on Triton,
    G = 1 in the model dtype on the compositions; unowned cache slots hold NaN."""
    k_cache, v_cache, tables, seq_lens = paged_cache(lens, block_size, hk, d, dtype, device, seed=b)
    g = torch.Generator().manual_seed(b * d)
    q = torch.randn(b, h, d, generator=g).to(dtype).to(device)
    wo = (torch.randn(c, h * d, generator=g) * (h * d) ** -0.5).to(dtype).to(device)
    bo = (0.5 * torch.randn(c, generator=g)).to(dtype).to(device) if bias else None
    args = (q, k_cache, v_cache, tables, seq_lens, d ** -0.5, wo, bo)
    ref = ops.decode_attention_o_ref(*args)
    with backend(backend_name, device):
        partials = ops.decode_attention_o(*args)
    g_parts = h if backend_name == "triton" else 1
    assert partials.shape == (g_parts, b, c)
    assert partials.dtype == (torch.float32 if backend_name == "triton" else dtype)
    assert_close(ops.reduce_partials_ref(partials, dtype), ref[0], dtype)


@pytest.mark.parametrize("b,h,c,d", [(1, 14, 896, 64), (3, 3, 70, 24), (2, 4, 200, 128)])
def test_decode_attention_o_gpu_splits(monkeypatch, b, h, c, d):
    """The GPU grid (outputs split in runs of 16 over several programs per head, each walking its run in BLOCK_C
    chunks, the last masked) under the interpreter, which otherwise runs one split: the same partials, bit for bit
    (an output's sum never crosses programs), as the oracle's."""
    if ops.unavailable_reason("triton"):
        pytest.skip(ops.unavailable_reason("triton"))
    from internvl_engine.kernels import decode_fused

    k_cache, v_cache, tables, seq_lens = paged_cache([1, 40, 17][:b], 16, 1 if h == 14 else h, d, torch.float32,
                                                     "cpu", seed=d)
    g = torch.Generator().manual_seed(c)
    q = torch.randn(b, h, d, generator=g)
    wo, bo = torch.randn(c, h * d, generator=g) * (h * d) ** -0.5, torch.randn(c, generator=g)
    args = (q, k_cache, v_cache, tables, seq_lens, d ** -0.5, wo, bo)
    with backend("triton", "cpu"):
        one = ops.decode_attention_o(*args)
        split = decode_fused._attention_o_split
        monkeypatch.setattr(decode_fused, "_attention_o_split", lambda *a: split(*a, interpret=False))
        assert split(b, h, c, max(16, d), interpret=False)[1] > 1
        many = ops.decode_attention_o(*args)
    assert torch.equal(one, many)
    assert_close(ops.reduce_partials_ref(many, torch.float32), ops.decode_attention_o_ref(*args)[0], torch.float32)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_parts,fp32_parts,b,k,f,bias", [
    (1, False, 1, 896, 4864, False),  # the compositions' partial: the o_proj output in the model dtype
    (14, True, 3, 200, 70, True),     # Triton's per-head fp32 partials, widths no block divides
    (7, True, 8, 130, 200, False),
])
def test_decode_gate_up(backend_name, device, dtype, g_parts, fp32_parts, b, k, f, bias):
    """(silu(gate) * up of RMSNorm(residual'), residual') with residual' = residual + sum of the partials, rounded
    as the default layer's post-attention add."""
    gen = torch.Generator().manual_seed(b * k + f)
    partials = (torch.randn(g_parts, b, k, generator=gen) * g_parts ** -0.5).to(
        torch.float32 if fp32_parts else dtype).to(device)
    r = (2 * torch.randn(b, k, generator=gen)).to(dtype).to(device)
    nw = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(device)
    w = (torch.randn(2 * f, k, generator=gen) * k ** -0.5).to(dtype).to(device)
    bb = (0.1 * torch.randn(2 * f, generator=gen)).to(dtype).to(device) if bias else None
    r0 = r.clone()
    with backend(backend_name, device):
        y, res = ops.decode_gate_up(partials, r, nw, 1e-6, w, bb)
    y_ref, res_ref = ops.decode_gate_up_ref(partials, r, nw, 1e-6, w, bb)
    assert y.shape == (b, f) and res.shape == (b, k) and res.dtype == dtype
    assert_close(res, res_ref, dtype)
    assert_close(y, y_ref, dtype)
    assert torch.equal(r, r0), "residual must not be modified"


def test_typed_errors_name_the_op_and_argument():
    args = _qkv_inputs(2, 64, 4, 2, 16, True, True, torch.float32)
    with pytest.raises(KernelInputError, match="decode_qkv: qkv_weight"):
        ops.decode_qkv(**(args | {"qkv_weight": args["qkv_weight"][:-16]}))
    with pytest.raises(KernelInputError, match="decode_qkv: q_norm_weight and k_norm_weight"):
        ops.decode_qkv(**(args | {"k_norm_weight": None}))
    with pytest.raises(KernelInputError, match="decode_qkv: positions"):
        ops.decode_qkv(**(args | {"positions": args["positions"][:1]}))
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(KernelInputError, match=r"decode_gemv_residual: residual must be \[2, 4\]"):
        ops.decode_gemv_residual(x, w, None, torch.randn(2, 8))
    p = torch.randn(3, 2, 8)
    with pytest.raises(KernelInputError, match="decode_gate_up: weight must be"):
        ops.decode_gate_up(p, x, torch.ones(8), 1e-6, torch.randn(5, 8), None)
    with pytest.raises(KernelInputError, match=r"decode_gate_up: partials must be \[G, 2, 8\] with G >= 1"):
        ops.decode_gate_up(p[:0], x, torch.ones(8), 1e-6, torch.randn(6, 8), None)
    with pytest.raises(KernelInputError, match=r"decode_gate_up: partials must be \[G, 2, 8\]"):
        ops.decode_gate_up(p[:, :1].contiguous(), x, torch.ones(8), 1e-6, torch.randn(6, 8), None)
    with pytest.raises(KernelInputError, match="decode_gate_up: partials must be float32/bfloat16"):
        ops.decode_gate_up(p.half(), x.bfloat16(), torch.ones(8).bfloat16(), 1e-6, torch.randn(6, 8).bfloat16(),
                           None)
    k_cache, v_cache, tables, seq_lens = paged_cache([3, 20], BS, 2, 16, torch.float32, "cpu", seed=0)
    q = torch.randn(2, 4, 16)
    attn = (q, k_cache, v_cache, tables, seq_lens, 0.25)
    with pytest.raises(KernelInputError, match=r"decode_attention_o: o_weight must be \[C, heads \* head_dim\] = "
                                               r"\[C, 4 \* 16 = 64\]"):
        ops.decode_attention_o(*attn, torch.randn(8, 60), None)
    with pytest.raises(KernelInputError, match="decode_attention_o: o_weight must be float32"):
        ops.decode_attention_o(*attn, torch.randn(8, 64).bfloat16(), None)
    with pytest.raises(KernelInputError, match="decode_attention_o: o_bias must have 8 elements"):
        ops.decode_attention_o(*attn, torch.randn(8, 64), torch.randn(7))
    with pytest.raises(KernelInputError, match="decode_attention_o: q .* does not fit caches"):
        ops.decode_attention_o(torch.randn(2, 3, 16), *attn[1:], torch.randn(8, 48), None)
    with pytest.raises(KernelInputError, match="decode_attention_o: block_tables"):
        ops.decode_attention_o(q, k_cache, v_cache, tables[:1], seq_lens, 0.25, torch.randn(8, 64), None)
    with pytest.raises(KernelInputError, match="decode_gemv_residual: weight"):
        ops.decode_gemv_residual(x, w.to(torch.bfloat16), None, torch.randn(2, 4))


# ------------------------------------------------------------------------------------------------ the path
_TEXT = {  # InternVL3-1B's decoder widths (random:internvl3-1b), and a Qwen3 decoder with q/k norm and head_dim 128
    "1b": dict(num_hidden_layers=2, vocab_size=1024),
    "qwen3": dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, intermediate_size=512, vocab_size=1024),
}


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name, backend_name):
        if (name, backend_name) not in built:
            raw = preset_config("internvl3-1b")
            raw["vision_config"].update(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=128)
            text = raw["text_config"]
            if _TEXT[name].get("model_type") == "qwen3":
                text = raw["text_config"] = preset_config("internvl3_5-1b")["text_config"]
            text.update(_TEXT[name])
            model = InternVLForConditionalGeneration(ModelConfig.from_dict(raw, f"test-{name}"),
                                                     ops.OpTable.resolve(backend_name))
            init_random_(model, 0)
            built[name, backend_name] = model.eval()
        return built[name, backend_name]
    return get


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int, graphs: bool = False) -> list[list[int]]:
    """Greedy tokens of each prompt over `steps` decode steps; sequence i owns blocks [8 i, 8 i + 8)."""
    cache = runner.allocate_pool(8 * len(prompts))
    if graphs:
        runner.enable_graphs(cache, 8, 8, emulate=True, vision=False)
    ids, pos, slots, rows = [], [], [], []
    for i, p in enumerate(prompts):
        ids += p
        pos += range(len(p))
        slots += [8 * i * BS + j for j in range(len(p))]
        rows.append(len(ids) - 1)
    lens = [len(p) for p in prompts]
    step = StepInput(True, ids, pos, slots, lens, lens, lens, logits_rows=rows)
    out = [[t] for t in runner.logits(step).argmax(-1).tolist()]
    for _ in range(steps):
        tables = np.array([[8 * i + j for j in range(8)] for i in range(len(prompts))], dtype=np.int32)
        step = StepInput(False, [o[-1] for o in out], list(lens), [8 * i * BS + n for i, n in enumerate(lens)],
                         [1] * len(lens), [n + 1 for n in lens], [n + 1 for n in lens], block_tables=tables)
        for o, t in zip(out, runner.logits(step).argmax(-1).tolist()):
            o.append(t)
        lens = [n + 1 for n in lens]
    return out


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 1024, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("name", ["1b", "qwen3"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fused_tokens_equal_default(models, name, backend_name):
    if backend_name == "triton" and ops.unavailable_reason("triton"):
        pytest.skip(ops.unavailable_reason("triton"))
    model = models(name, backend_name)
    steps = 3 if backend_name == "triton" else 6  # the interpreter reads the 1B layer's 15M weights in ~2 s
    for batch in (1, 5):
        prompts = _prompts(batch)
        default = _greedy(ModelRunner(model, torch.device("cpu"), torch.float32, BS), prompts, steps)
        fused_runner = ModelRunner(model, torch.device("cpu"), torch.float32, BS, decode_path="fused")
        assert model.fused_decode is not None, model.fused_unsupported
        assert _greedy(fused_runner, prompts, steps) == default
    model.set_decode_path("default")


def test_fused_decode_graphs(models):
    """Emulated decode graphs capture whichever forward the model picks: the fused one at batch buckets 1..8."""
    model = models("1b", "torch")
    prompts = _prompts(3)
    default = _greedy(ModelRunner(model, torch.device("cpu"), torch.float32, BS), prompts, 4)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BS, decode_path="fused")
    calls = _Counting(model.ops)
    model.use_ops(calls)
    try:
        assert _greedy(runner, prompts, 4, graphs=True) == default
    finally:
        model.use_ops(calls.table)
        model.set_decode_path("default")
    assert runner.graphs.replays == 4 and calls.counts["decode_qkv"] > 0


# ------------------------------------------------------------------------------------------------ op calls
class _Counting:
    """An OpTable stand-in counting each op call; while an op runs, torch calls are the op's own, not the model's."""

    def __init__(self, table):
        self.table, self.counts, self.inside = table, {}, False
        self.binding, self.name = table.binding, table.name
        for op in ops.OPS:
            setattr(self, op, self._wrap(op, getattr(table, op)))

    def _wrap(self, op, fn):
        def run(*args, **kwargs):
            self.counts[op] = self.counts.get(op, 0) + 1
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = False
        return run


class _Launches(TorchFunctionMode):
    """The model's own kernel launches outside the contract ops: matmuls, SiLU, the gating product, copies."""
    COUNTED = {F.linear: "linear", F.silu: "silu", torch.Tensor.__mul__: "mul", torch.Tensor.mul: "mul"}

    def __init__(self, calls: _Counting):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.calls.inside:
            name = self.COUNTED.get(func)
            if func is torch.Tensor.contiguous and not args[0].is_contiguous():
                name = "copy"
            if name:
                self.calls.counts[name] = self.calls.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _launches_per_layer(model, path: str) -> dict[str, int]:
    """Calls of one decode step of 3 sequences inside the decoder (the final norm, once per step, left out)."""
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BS, decode_path=path)
    runner.allocate_pool(32)
    prompts = _prompts(3)
    lens = [len(p) for p in prompts]
    ids = sum(prompts, [])
    slots = [8 * i * BS + j for i, p in enumerate(prompts) for j in range(len(p))]
    with torch.inference_mode():  # the prompts into the cache (a chunk that samples nothing: no logits)
        runner._logits(StepInput(True, ids, [j for p in prompts for j in range(len(p))], slots, lens, lens, lens,
                                 logits_rows=[]))
    tables = np.array([[8 * i + j for j in range(8)] for i in range(3)], dtype=np.int32)
    step = StepInput(False, [1, 2, 3], lens, [8 * i * BS + n for i, n in enumerate(lens)], [1] * 3,
                     [n + 1 for n in lens], [n + 1 for n in lens], block_tables=tables)
    calls = _Counting(model.ops)
    model.use_ops(calls)
    try:
        with torch.inference_mode(), _Launches(calls):
            meta = runner._metadata(step)
            model(torch.tensor(step.input_ids), torch.tensor(step.positions), meta)
    finally:
        model.use_ops(calls.table)
        model.set_decode_path("default")
    counts = dict(calls.counts)
    counts["rms_norm"] -= 1  # the final norm
    layers = model.config.text.num_hidden_layers
    assert all(n % layers == 0 for n in counts.values()), counts
    return {k: n // layers for k, n in counts.items() if n}


@pytest.mark.parametrize("name,default_calls", [("1b", 11), ("qwen3", 15)])
def test_op_calls_per_layer(models, name, default_calls):
    """Today's layer launches 11 kernels at decode (4 matmuls, 2 norms, rotary, the KV write, paged attention, SiLU,
    the product; Qwen3 adds q and k norms and the copies they need); the fused path 4 contract ops, Qwen3's too
    (issue 3.6's target: at most 4) and nothing else (no matmul, SiLU, product or copy outside them)."""
    model = models(name, "torch")
    default = _launches_per_layer(model, "default")
    fused = _launches_per_layer(model, "fused")
    assert sum(default.values()) == default_calls, default
    assert fused == {"decode_qkv": 1, "decode_attention_o": 1, "decode_gate_up": 1, "decode_gemv_residual": 1}, fused
    assert sum(fused.values()) == 4


def test_engine_flag_and_fallbacks(tmp_path):
    """EngineConfig.decode_path reaches the model through LLM; greedy text equals the default path's; batches over
    8, prefill and tensor parallelism take the default forward."""
    from internvl_engine.models.decode_fused import FusedDecode
    from internvl_engine.layers.attention import AttentionMetadata

    prompts = ["Hello there", "The capital of France is", "a b c d"]
    params = SamplingParams(max_tokens=8, temperature=0)
    outs = {}
    for path in ("default", "fused"):
        llm = LLM("random:tiny-qwen3", device="cpu", kv_cache_tokens=2048, decode_path=path)
        assert (llm.engine.model.fused_decode is not None) == (path == "fused")
        outs[path] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["fused"] == outs["default"]
    slots = torch.zeros(9, dtype=torch.int64)
    assert not FusedDecode.applies(torch.zeros(9, 4), AttentionMetadata(False, slots, [None]))
    assert not FusedDecode.applies(torch.zeros(2, 4), AttentionMetadata(True, slots[:2], [None]))
    assert FusedDecode.applies(torch.zeros(8, 4), AttentionMetadata(False, slots[:8], [None]))
    with pytest.raises(Exception, match="decode_path"):
        LLM("random:tiny", device="cpu", decode_path="fast")


# ------------------------------------------------------------------------------------------------ the GPU build
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from internvl_engine.kernels import decode_fused as m

def compile_(fn, ptrs, scalars, consts):
    sig = {**{p: ptr for p, ptr in ptrs.items()}, **scalars, **dict.fromkeys(consts, "constexpr")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"launch_pdl": consts["USE_PDL"]})  # the launch option _pdl() passes
    assert k.metadata.launch_pdl == consts["USE_PDL"]
    assert "cubin" in k.asm and ("griddepcontrol.wait" in k.asm["ptx"]) == consts["USE_PDL"], fn.__name__
    print(fn.__name__, "compiled")

for dt, pdl in (("fp32", False), ("bf16", True)):
    p, prec = "*" + dt, "ieee" if dt == "fp32" else None
    tiles = dict(DOT_PREC=prec, BLOCK_B=16, BLOCK_K=128, USE_PDL=pdl)  # the launchers' GPU tiles
    compile_(m._gemv_residual_kernel, dict.fromkeys(("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr"), p),
             dict.fromkeys(("B", "N", "K"), "i32"), dict(HAS_BIAS=True, BLOCK_N=m._block_n(896), **tiles))
    compile_(m._gate_up_kernel, {**dict.fromkeys(("r_ptr", "nw_ptr", "w_ptr", "b_ptr", "y_ptr", "ro_ptr"), p),
                                 "p_ptr": "*fp32"},
             {"G": "i32", "B": "i32", "F": "i32", "K": "i32", "eps": "fp32"},
             dict(HAS_BIAS=False, BLOCK_N=m._block_n(4864), **tiles))
    d, bias = (64, True) if dt == "fp32" else (128, False)  # InternVL3-1B's heads, then 2B's
    compile_(m._attention_o_kernel, {**dict.fromkeys(("q_ptr", "kc_ptr", "vc_ptr", "w_ptr", "b_ptr"), p),
                                     "bt_ptr": "*i32", "sl_ptr": "*i32", "p_ptr": "*fp32"},
             {"qk_scale": "fp32", **dict.fromkeys(("B", "H", "HK", "C", "max_blocks", "c_per_split", "stride_qb",
                                                   "stride_btb"), "i32")},
             dict(D=d, BLOCK_D=d, BLOCK_SIZE=16, BLOCK_N=m.token_step(16), HAS_BIAS=bias, USE_PDL=pdl,
                  BLOCK_C=m._attention_o_split(1, 14, 1536, d)[0]))
    for qk_norm, d, bh in ((False, 64, m._HEAD_BLOCK), (True, 128, 64)):
        ptrs = dict.fromkeys(("x_ptr", "nw_ptr", "w_ptr", "b_ptr", "qn_ptr", "kn_ptr", "q_ptr", "kc_ptr", "vc_ptr"), p)
        ptrs |= {"pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64"}
        compile_(m._qkv_kernel, ptrs, {**dict.fromkeys(("B", "K", "H", "HK", "stride_cs"), "i32"), "eps": "fp32"},
                 dict(D=d, HALF=d // 2, HAS_BIAS=True, QK_NORM=qk_norm, DOT_PREC=prec, BLOCK_B=16, BLOCK_H=bh,
                      BLOCK_K=128, USE_PDL=pdl))
"""


def test_kernels_compile_for_sm90():
    """The GPU branch of kernels/decode_fused.py (tl.dot tiles, jit helpers, PDL's griddepcontrol), which the
    interpreter never runs, compiled to a Hopper cubin here: fp32 without PDL, bf16 with it."""
    compile_for_sm90(_COMPILE, 10)  # 5 kernels (qkv with and without q/k norm) x 2 (dtype, PDL)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_kernels_on_cuda(monkeypatch, pdl):
    """On the device: each op with programmatic dependent launch on and off, chained as the model chains them,
    against the oracles; then the chain captured in a CUDA graph and replayed."""
    from internvl_engine.kernels import decode_fused

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(decode_fused, "PDL", pdl)
    args = _on(_qkv_inputs(5, 896, 14, 2, 64, True, False, torch.bfloat16), "cuda")
    g = torch.Generator().manual_seed(1)
    wo = (torch.randn(896, 896, generator=g) / 30).to(torch.bfloat16).cuda()
    k_cache, v_cache, tables, seq_lens = (t.cuda() for t in paged_cache([1, 17, 40, 64, 3], BS, 2, 64,
                                                                        torch.bfloat16, "cpu", seed=3))
    wgu = (torch.randn(2 * 4864, 896, generator=g) / 30).to(torch.bfloat16).cuda()
    wd = (torch.randn(896, 4864, generator=g) / 70).to(torch.bfloat16).cuda()
    nw = args["norm_weight"]

    def chain(attn=ops.decode_attention_o, qkv=ops.decode_qkv, gate_up=ops.decode_gate_up,
              down=ops.decode_gemv_residual, **over):
        a = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()} if over else args
        q = qkv(**a)  # its own caches (a tiny pool), then attention over a paged pool of 5 sequences
        parts = attn(q, k_cache, v_cache, tables, seq_lens, 0.125, wo, None)
        h, r = gate_up(parts, a["x"], nw, 1e-6, wgu, None)
        return down(h, wd, None, r)

    def chain_ref():
        return chain(ops.decode_attention_o_ref, ops.decode_qkv_ref, ops.decode_gate_up_ref,
                     ops.decode_gemv_residual_ref, copy=True)

    with ops.use_backend("triton", "cuda"):
        y = chain()
        ref = chain_ref()
        torch.testing.assert_close(y.float(), ref.float(), atol=0.1, rtol=0.05)
        graph = torch.cuda.CUDAGraph()
        chain()  # warm: compiled before capture
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, y)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_fused_engine_on_cuda(preset):
    """On the device, fp32, Triton backend, decode graphs on: greedy tokens of the fused path (its forward captured
    in the graphs, the sampler inside them) equal the default path's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    prompts = ["Hello there", "The capital of France is", "a b c d", "Once upon a time"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for path in ("default", "fused"):
        llm = LLM(f"random:{preset}", device="cuda", dtype="float32", backend="triton", kv_cache_tokens=4096,
                  max_num_seqs=8, decode_path=path)
        outs[path] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.replays > 0
        assert (llm.engine.model.fused_decode is not None) == (path == "fused")
        del llm
    assert outs["fused"] == outs["default"]
