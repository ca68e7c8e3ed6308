"""CUDA checks (`python -m pytest -m gpu`, run by benchmarks/gpu_check.sh on the device machine).
bf16 follows the spec's rule (section 10): generated ids equal transformers', or the first disagreement falls
where transformers' own top-2 margin is tiny."""
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
CONV = [{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                     {"type": "text", "text": "Describe this image in detail."}]}]


def _hf_on_cuda(hf_model, dtype):
    from transformers import InternVLForConditionalGeneration
    m = InternVLForConditionalGeneration(hf_model.config).to(dtype)
    m.load_state_dict(hf_model.state_dict())
    return m.to("cuda").eval()


def _to(inputs, dtype):
    return {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}


def _check_bf16_ids(ours, ref_ids, ref_logits, rel_margin=0.02):
    for i, (a, b) in enumerate(zip(ours, ref_ids)):
        if a != b:
            top2 = ref_logits[i].float().topk(2).values
            assert (top2[0] - top2[1]).item() <= rel_margin * max(1.0, top2[0].abs().item()), \
                f"step {i}: {a} != {b} with top-2 logits {top2.tolist()}"
            return i
    return None


GPU_BACKENDS = ["torch", "triton", "cuda"]


def _llm(path, **kw):
    # a fixed KV pool instead of 90 % of free memory: gpu_check.sh runs these tests in parallel processes
    return LLM(path, kv_cache_tokens=32768, **kw)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_fp32_cuda_matches_transformers(hf_checkpoint, variant, backend):
    path, hf_model = hf_checkpoint(variant)
    inputs = hf_inputs(make_hf_processor(path), CONV, 4)
    ref_model = _hf_on_cuda(hf_model, torch.float32)
    ref = hf_logits(ref_model, _to(inputs, torch.float32)).cpu()
    llm = _llm(path, dtype="float32", device="cuda", backend=backend)
    params = SamplingParams(max_tokens=16, ignore_eos=True, return_logits=True, max_num_tiles=4)
    assert (llm.prompt_logits(CONV, params=params) - ref).abs().max().item() <= 1e-3
    out = llm.generate(CONV, params)[0]
    ref_ids, _ = hf_greedy(ref_model, _to(inputs, torch.float32), 16)
    assert out.token_ids == ref_ids


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_bf16_cuda_follows_spec_rule(hf_checkpoint, variant, backend):
    path, hf_model = hf_checkpoint(variant)
    inputs = _to(hf_inputs(make_hf_processor(path), CONV, 4), torch.bfloat16)
    ref_model = _hf_on_cuda(hf_model, torch.bfloat16)
    llm = _llm(path, dtype="bfloat16", device="cuda", backend=backend)
    out = llm.generate(CONV, SamplingParams(max_tokens=32, ignore_eos=True, max_num_tiles=4))[0]
    ref_ids, ref_logits = hf_greedy(ref_model, inputs, 32)
    _check_bf16_ids(out.token_ids, ref_ids, ref_logits)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_internvl3_1b_shape_bf16_cuda(hf_checkpoint, backend):
    path, hf_model = hf_checkpoint("internvl3-1b")
    inputs = hf_inputs(make_hf_processor(path), CONV, 6)
    ref_model = _hf_on_cuda(hf_model, torch.bfloat16)
    llm = _llm(path, dtype="bfloat16", device="cuda", backend=backend)
    out = llm.generate(CONV, SamplingParams(max_tokens=32, ignore_eos=True, max_num_tiles=6))[0]
    ref_ids, ref_logits = hf_greedy(ref_model, _to(inputs, torch.bfloat16), 32)
    _check_bf16_ids(out.token_ids, ref_ids, ref_logits)
    assert out.metrics.generated_tokens == 32


def test_batch_matches_single_on_cuda(hf_checkpoint):
    path, _ = hf_checkpoint("300m")
    llm = _llm(path, dtype="float32", device="cuda")
    text = [{"role": "user", "content": "Write a haiku."}]
    batch = [text, CONV]
    params = SamplingParams(max_tokens=16, ignore_eos=True, max_num_tiles=4)
    together = llm.generate(batch, params)
    for conv, out in zip(batch, together):
        assert out.token_ids == llm.generate(conv, params)[0].token_ids


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decode_from_cuda_graphs_is_batch_invariant(hf_checkpoint, backend):
    """Decode replays CUDA graphs (serving-runtime issue); bf16 ids of each request are the same alone, in a batch
    of 8, and with enforce_eager=True."""
    path, _ = hf_checkpoint("300m")
    rng = np.random.default_rng(1)
    convs = [[{"role": "user", "content": [{"type": "image", "image": Image.fromarray(
                 rng.integers(0, 256, (200 + 40 * i, 300, 3), dtype=np.uint8))},
                                            {"type": "text", "text": f"Question {i}: what is shown?"}]}]
             for i in range(8)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, max_num_tiles=2)
    llm = _llm(path, dtype="bfloat16", device="cuda", backend=backend)
    graphs = llm.runner.graphs
    assert graphs is not None and (1, graphs.widths[0]) in graphs.graphs
    together = [o.token_ids for o in llm.generate(convs, params)]
    assert graphs.replays >= 23
    alone = [llm.generate(c, params)[0].token_ids for c in convs]
    assert together == alone
    eager = _llm(path, dtype="bfloat16", device="cuda", backend=backend, enforce_eager=True)
    assert eager.runner.graphs is None
    eager_ids = [o.token_ids for o in eager.generate(convs, params)]
    if backend != "torch":  # torch's SDPA over the gathered table is not invariant to the table's width
        assert eager_ids == together


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_vision_from_cuda_graphs_equals_eager(hf_checkpoint, backend):
    """The vision tower replays a graph per tile count (cuda_graphs.VisionGraphs): bf16 features identical to the
    eager tower's on the same chunk, at its capture and at a later replay."""
    path, _ = hf_checkpoint("300m")
    llm = _llm(path, dtype="bfloat16", device="cuda", backend=backend, vision_graphs=True)  # opt-in until shown equal
    runner = llm.runner
    assert runner.vision_graphs is not None
    pixels = torch.randn(5, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    for n in (1, 3, 1, 5, 3):
        with torch.inference_mode():
            eager = runner.model.get_image_features(pixels[:n].cuda())
        assert torch.equal(runner.vision(pixels[:n]), eager), f"{n} tiles"
    assert set(runner.vision_graphs.graphs) == {1, 3, 5} and runner.vision_graphs.replays == 5
