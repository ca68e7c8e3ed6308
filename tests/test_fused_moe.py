"""fused_moe (routed SwiGLU experts) on every backend against its oracle ops.fused_moe_ref, the oracle against an
fp64 formula written here, on odd shapes and routings: experts with no tokens, one token, every token on one expert,
k = 1 and 8, E not a power of two, F and Hd not multiples of the Triton blocks (64) nor of the C++ tiles (4 / 32),
both Triton block heights (16 and 64 rows). Triton through its interpreter on the CPU."""
import functools

import pytest
import torch

from internvl_engine import ops
from internvl_engine.errors import KernelInputError
from kernel_cases import BACKENDS, DTYPES, backend, compile_for_sm90

# (tokens, hidden Hd, experts E, expert width F, k, routing); routing "random": top-k of a random softmax,
# "subset": only experts 1, 3 and E-1 are ever routed to (the rest get no token), "one": every token's first
# choice is expert E-1 (with k = 1: every token on that one expert).
CASES = [(1, 72, 6, 40, 1, "random"),       # decode, k = 1
         (1, 96, 10, 24, 8, "random"),      # decode, k = 8, E not a power of two
         (5, 40, 3, 56, 3, "random"),       # k = E: every expert, every token
         (13, 72, 10, 40, 8, "random"),
         (20, 130, 5, 70, 2, "random"),     # Hd and F over one 64-wide block, neither a multiple of it
         (37, 48, 7, 24, 3, "subset"),      # experts with no tokens
         (9, 40, 6, 24, 1, "one"),          # all tokens on one expert
         (70, 40, 4, 24, 2, "one"),         # 140 slots >= 32 * E: the Triton kernel's 64-row blocks
         (0, 40, 4, 24, 2, "random")]       # no tokens


def _routing(tokens, experts, k, routing, g):
    """(weights [T, k] fp32, distinct per slot as a router's are, summing to 1; ids [T, k] int64, distinct per
    token)."""
    sub = torch.tensor([1, 3, experts - 1])
    rows = []
    for _ in range(tokens):
        if routing == "random":
            rows.append(torch.randperm(experts, generator=g)[:k])
        elif routing == "subset":
            rows.append(sub[torch.randperm(3, generator=g)[:k]])
        else:
            rows.append(torch.cat([sub[2:], torch.randperm(experts - 1, generator=g)[:k - 1]]))
    ids = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)
    return torch.softmax(torch.randn(tokens, k, generator=g) * 2, -1), ids


def _inputs(tokens, hd, experts, f, k, routing, dtype, device, seed=0):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(seed * 7919 + tokens * 131 + hd * 17 + experts)
    x = torch.randn(tokens, hd, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * f, hd, generator=g) * hd ** -0.5).to(dtype)
    w2 = (torch.randn(experts, hd, f, generator=g) * f ** -0.5).to(dtype)
    weights, ids = _routing(tokens, experts, k, routing, g)
    return [t.to(device) for t in (x, w13, w2, weights, ids)]


def _moe64(x, w13, w2, weights, ids):
    """The op's definition in fp64, vectorised over slots (not the oracle's loop)."""
    f = w2.shape[2]
    gu = torch.einsum("tkoh,th->tko", w13.double()[ids], x.double())
    h = torch.nn.functional.silu(gu[..., :f]) * gu[..., f:]
    return torch.einsum("tk,tkhf,tkf->th", weights.double(), w2.double()[ids], h)


def assert_moe_close(out, ref, dtype):
    """fp32: summation order only (1e-5 of the output's scale). bf16 / fp16: the backends round the expert
    activations to the storage dtype at different steps (torch after every op, as transformers; the Triton kernel
    the intermediate; the C++ one only y), 3e-2 of the scale: about 4 bf16 units at the largest output."""
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    scale = max(ref.float().abs().amax().item() if ref.numel() else 0.0, 1.0)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("tokens,hd,experts,f,k,routing", CASES[:6])
def test_oracle_is_the_definition(tokens, hd, experts, f, k, routing):
    x, w13, w2, weights, ids = _inputs(tokens, hd, experts, f, k, routing, torch.float32, "cpu")
    torch.testing.assert_close(ops.fused_moe_ref(x, w13, w2, weights, ids).double(),
                               _moe64(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hd,experts,f,k,routing", CASES)
def test_fused_moe_matches_oracle(name, device, dtype, tokens, hd, experts, f, k, routing):
    _run(name, device, dtype, tokens, hd, experts, f, k, routing)


def _run(name, device, dtype, tokens, hd, experts, f, k, routing):
    """Also used by test_triton_configs (each Triton config forced)."""
    x, w13, w2, weights, ids = _inputs(tokens, hd, experts, f, k, routing, dtype, device)
    ref = ops.fused_moe_ref(x, w13, w2, weights, ids)
    with backend(name, device):
        out = ops.fused_moe(x, w13, w2, weights, ids)
        out32 = ops.fused_moe(x, w13, w2, weights, ids.int())
    assert_moe_close(out, ref, dtype)
    assert torch.equal(out, out32), "int32 and int64 ids must give the same result"


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_transformers_qwen3_moe_experts(dtype):
    """ops/moe_ops.py follows transformers' Qwen3MoeExperts.forward op for op (the model-parity tests rely on it):
    bit-identical in bf16, where every step rounds; in fp32 only the rows each expert's matmul sees are ordered
    differently (token order here, (j, token) order there), within a few fp32 units."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    x, w13, w2, weights, ids = _inputs(23, 72, 10, 40, 8, "random", dtype, "cpu")
    config = Qwen3MoeConfig(hidden_size=72, moe_intermediate_size=40, num_experts=10, num_experts_per_tok=8,
                            hidden_act="silu")
    experts = Qwen3MoeExperts(config).to(dtype)
    experts.gate_up_proj.data, experts.down_proj.data = w13, w2
    with torch.no_grad():
        # transformers' router hands over its weights in the hidden dtype (Qwen3MoeTopKRouter.forward)
        want = experts(x, ids, weights.to(dtype))
    with backend("torch", "cpu"):
        out = ops.fused_moe(x, w13, w2, weights, ids)
    if dtype == torch.bfloat16:
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_unrouted_experts_are_never_read(name, device):
    """Experts no slot routes to hold NaN: any read of them (a padded row, a dropped mask, a whole-E loop) would
    poison y. At batch 1 this is the 'only the k experts' weights are read' property."""
    for tokens, routing in ((1, "random"), (11, "subset")):
        x, w13, w2, weights, ids = _inputs(tokens, 40, 9, 24, 2, routing, torch.float32, device)
        unused = torch.ones(9, dtype=torch.bool)
        unused[ids.flatten().cpu()] = False
        w13[unused.to(device)] = float("nan")
        w2[unused.to(device)] = float("nan")
        with backend(name, device):
            out = ops.fused_moe(x, w13, w2, weights, ids)
        assert unused.any() and out.isfinite().all()
        assert_moe_close(out, ops.fused_moe_ref(x, w13, w2, weights, ids), torch.float32)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_deterministic_and_inputs_untouched(name, device):
    x, w13, w2, weights, ids = _inputs(29, 72, 6, 40, 3, "random", torch.bfloat16, device)
    before = [t.clone() for t in (x, w13, w2, weights, ids)]
    with backend(name, device):
        a = ops.fused_moe(x, w13, w2, weights, ids)
        b = ops.fused_moe(x, w13, w2, weights, ids)
    assert torch.equal(a, b)
    assert all(torch.equal(t, u) for t, u in zip((x, w13, w2, weights, ids), before))


def test_cpp_token_results_do_not_depend_on_the_batch():
    """csrc/cpu/fused_moe.cpp: each token's dots accumulate in a fixed order whatever shares its experts."""
    x, w13, w2, weights, ids = _inputs(17, 72, 6, 40, 2, "random", torch.float32, "cpu")
    with backend("cpp", "cpu"):
        full = ops.fused_moe(x, w13, w2, weights, ids)
        for t in (0, 8, 16):
            alone = ops.fused_moe(x[t:t + 1].contiguous(), w13, w2, weights[t:t + 1].contiguous(),
                                  ids[t:t + 1].contiguous())
            assert torch.equal(alone[0], full[t])


@pytest.mark.parametrize("name", ["torch", "cpp"])
@pytest.mark.parametrize("bad", [-1, 6])
def test_host_backends_reject_out_of_range_ids(name, bad):
    x, w13, w2, weights, ids = _inputs(4, 40, 6, 24, 2, "random", torch.float32, "cpu")
    ids[2, 1] = bad
    with backend(name, "cpu"), pytest.raises(KernelInputError, match=r"fused_moe: topk_ids .*\[0, 6\)"):
        ops.fused_moe(x, w13, w2, weights, ids)


def test_triton_drops_out_of_range_slots():
    """The Triton path cannot see the ids without a host sync: a slot with an id outside [0, E) contributes
    nothing (and nothing out of bounds is read)."""
    x, w13, w2, weights, ids = _inputs(5, 40, 6, 24, 2, "random", torch.float32, "cpu")
    bad = ids.clone()
    bad[1, 0], bad[3, 1] = -3, 6
    kept = weights.clone()
    kept[1, 0] = kept[3, 1] = 0
    with backend("triton", "cpu"):
        out = ops.fused_moe(x, w13, w2, weights, bad)
    assert_moe_close(out, ops.fused_moe_ref(x, w13, w2, kept, ids), torch.float32)


def test_triton_alignment_pads_each_expert_to_whole_blocks():
    """kernels/fused_moe.align: every block holds one expert's slots in token order, padding rows hold T*k, the
    block count is the static bound, and blocks past the padded length are marked E (they exit at once)."""
    from internvl_engine.kernels.fused_moe import align
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [7, 2]])   # expert 1 and 4..6 empty; 7 is out of range for E = 5
    slots, block_expert = align(ids, 5, 4)
    s = ids.numel()
    assert block_expert.shape[0] == -(-(s + min(5, s) * 3) // 4) and slots.shape[0] == 4 * block_expert.shape[0]
    assert slots[:12].tolist() == [1, 4, s, s, 0, 2, 5, 7, 3, s, s, s]
    assert block_expert.tolist()[:3] == [0, 2, 3] and set(block_expert.tolist()[3:]) == {5}
    assert set(slots[12:].tolist()) == {s}


def _bad_args():
    x, w13, w2, weights, ids = _inputs(3, 40, 5, 24, 2, "random", torch.float32, "cpu")
    ok = dict(x=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    yield ok | {"x": x.to(torch.float64)}, r"x must be float32/float16/bfloat16"
    yield ok | {"x": x.t().contiguous().t()}, r"x must be contiguous"
    yield ok | {"w13": w13.half()}, r"w13 must be float32"
    yield ok | {"w13": w13[:, :47].contiguous()}, r"w13 must be \[E, 2F, 40\]"
    yield ok | {"w13": w13[..., :39].contiguous()}, r"w13 must be \[E, 2F, 40\]"
    yield ok | {"w2": w2[:4].contiguous()}, r"w2 must be \[E, Hd, F\] = \(5, 40, 24\)"
    yield ok | {"w2": w2[..., :23].contiguous()}, r"w2 must be \[E, Hd, F\]"
    yield ok | {"topk_weights": weights.bfloat16()}, r"topk_weights must be float32"
    yield ok | {"topk_ids": ids.float()}, r"topk_ids must be int32/int64"
    yield ok | {"topk_ids": ids[:2]}, r"topk_weights .* must both be \[3, k\]"
    yield ok | {"topk_weights": weights[:, :1].contiguous()}, r"topk_weights .* must both be \[3, k\]"
    yield (ok | {"topk_ids": torch.zeros(3, 6, dtype=torch.int64), "topk_weights": torch.ones(3, 6)},
           r"k \(topk_ids.shape\[1\] = 6\) must lie in \[1, E = 5\]")
    yield ok | {"topk_ids": ids.to("meta")}, r"topk_ids is on meta but the other inputs are on cpu"
    yield ok | {"w2": [[0.0]]}, r"w2 must be a torch.Tensor"


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_bad_arguments_are_typed_errors(name):
    with backend(name, "cpu"):
        for kwargs, msg in _bad_args():
            with pytest.raises(KernelInputError, match="fused_moe: " + msg):
                ops.fused_moe(**kwargs)


@functools.cache
def _experts_30b_a3b():
    """One 30B-A3B layer's experts (Hd 2048, E 128, F 768) in bf16, drawn on the GPU once for the module."""
    g = torch.Generator("cuda").manual_seed(0)
    w13 = (torch.randn(128, 2 * 768, 2048, generator=g, device="cuda") * 2048 ** -0.5).bfloat16()
    w2 = (torch.randn(128, 2048, 768, generator=g, device="cuda") * 768 ** -0.5).bfloat16()
    return w13, w2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_cuda_at_the_30b_a3b_shape(name, tokens):
    """Decode, a batch and a prefill size at the real layer shape (k 8), bf16, on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    w13, w2 = _experts_30b_a3b()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2048, generator=g).bfloat16().cuda()
    weights, ids = (t.cuda() for t in _routing(tokens, 128, 8, "random", g))
    with backend(name, "cuda"):
        out = ops.fused_moe(x, w13, w2, weights, ids)
    assert_moe_close(out, ops.fused_moe_ref(x, w13, w2, weights, ids), torch.bfloat16)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from internvl_engine.kernels import fused_moe as m

for dt in ("fp32", "bf16"):
    p = "*" + dt
    consts = dict(DOT_F32=dt == "fp32", DOT_PREC="ieee" if dt == "fp32" else None, BLOCK_M=16, BLOCK_N=64,
                  BLOCK_K=64)
    common = {"slots_ptr": "*i32", "block_expert_ptr": "*i64", "S": "i32", "N": "i32", "K": "i32", "E": "i32"}
    for fn, ptrs in ((m._gate_up_kernel, {"x_ptr": p, "w13_ptr": p, "inter_ptr": p, "TOPK": "i32"}),
                     (m._down_kernel, {"inter_ptr": p, "w2_ptr": p, "tw_ptr": "*fp32", "part_ptr": "*fp32"})):
        sig = {**ptrs, **common, **dict.fromkeys(consts, "constexpr")}
        k = triton.compile(ASTSource(fn=fn.fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert "cubin" in k.asm
        print(fn.fn.__name__, "compiled")
"""


def test_kernels_compile_for_sm90():
    """The GPU branch of kernels/fused_moe.py (tl.dot on 16-row blocks, the jit helpers, the early exit of padding
    blocks), which the interpreter never runs, compiled to a Hopper cubin here, fp32 and bf16."""
    compile_for_sm90(_COMPILE, 4)


@pytest.mark.gpu
def test_triton_is_cuda_graph_safe():
    """The Triton path reads nothing on the host: it captures in a CUDA graph, and a replay with new routing and
    activations matches the oracle."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w13, w2, weights, ids = _inputs(8, 256, 16, 96, 4, "random", torch.bfloat16, "cuda")
    with backend("triton", "cuda"):
        ops.fused_moe(x, w13, w2, weights, ids)  # compile and tune outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.fused_moe(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = _inputs(8, 256, 16, 96, 4, "subset", torch.bfloat16, "cuda", seed=1)
    x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
    graph.replay()
    assert_moe_close(out, ops.fused_moe_ref(x, w13, w2, weights, ids), torch.bfloat16)
