"""fp32 parity with transformers' InternVLForConditionalGeneration on random-weight checkpoints it wrote itself:
prompt logits, 16 greedy tokens and every step's logits, for both vision-tower styles, each decoder family (Qwen2,
Llama, Qwen3: tests/checkpoints.py VARIANTS), four kinds of prompt and every CPU kernel backend."""
import numpy as np
import pytest
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine._C import PAGED_SPLIT_TOKENS
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits

ATOL = 1e-4


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _frames(n, w, h, seed=7):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


CONVERSATIONS = {
    "text": [{"role": "user", "content": "Write a haiku."}],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": _image(700, 300, 1)},
                                               {"type": "text", "text": "Describe this image in detail."}]}],
    "two_images": [{"role": "user", "content": [{"type": "image", "image": _image(64, 64, 2)},
                                                {"type": "text", "text": "Compare"},
                                                {"type": "image", "image": _image(200, 420, 3)},
                                                {"type": "text", "text": "these two."}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": _frames(3, 131, 97)},
                                           {"type": "text", "text": "What happens?"}]}],
}
MAX_TILES = 4
# The triton backend runs on the CPU through Triton's interpreter, a Python loop over every program and block: at
# 448-pixel tiles its two 6B-tower cases alone took 8 of the default run's 31 minutes on 2 cores. Its checkpoints
# have 224-pixel tiles instead (256 vision tokens and 64 image tokens a tile, against 1024 and 256), which run the
# same kernel paths on a quarter of the tokens: vision flash attention over several query and key blocks a tile,
# causal prefill over odd lengths with GQA (300m) and without (6b), decode over one split and, for "two_images"
# (checked below), over several (a prompt past PAGED_SPLIT_TOKENS), in both tower styles. torch and cpp keep 448
# (the checkpoints the other test files share).
TRITON_IMAGE_SIZE = 224

_references: dict = {}


def reference(hf_model, hf_proc, path, kind):
    """(inputs, prompt logits, greedy ids, their step logits) of transformers for one checkpoint and conversation,
    computed once and shared by the backends that run that checkpoint (`pair` runs them one after another). Only
    the current checkpoint's are kept: an image prompt's fp32 logits over the vocabulary are about a gigabyte, and
    keeping every checkpoint's ran the default suite out of memory."""
    key = (str(path), kind)
    if any(p != key[0] for p, _ in _references):
        _references.clear()
    if key not in _references:
        inputs = hf_inputs(hf_proc, CONVERSATIONS[kind], MAX_TILES)
        _references[key] = (inputs, hf_logits(hf_model, inputs), *hf_greedy(hf_model, inputs, 16))
    return _references[key]


# Both tower styles of each decoder family: Qwen2 ("300m", "6b"), Llama (GQA, no biases, head_dim 24 / 64 against
# hidden / heads 16 / 32, dynamic NTK) and Qwen3 (q/k norm, head_dim 32 / 64 against 16 / 32; untied / tied).
VARIANTS = ("300m", "6b", "llama-300m", "llama-6b", "qwen3-300m", "qwen3-6b")


@pytest.fixture(scope="module", params=[(v, b) for v in VARIANTS for b in ("torch", "cpp", "triton")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, hf_checkpoint):
    """The same checks on every CPU kernel backend (triton through its interpreter)."""
    variant, backend = request.param
    path, hf_model = hf_checkpoint(variant, **({"image_size": TRITON_IMAGE_SIZE} if backend == "triton" else {}))
    return LLM(path, dtype="float32", device="cpu", backend=backend), hf_model, make_hf_processor(path), path


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_prompt_logits_and_greedy_match_transformers(pair, kind):
    llm, hf_model, hf_proc, path = pair
    conv = CONVERSATIONS[kind]
    params = SamplingParams(max_tokens=16, return_logits=True, ignore_eos=True, max_num_tiles=MAX_TILES)
    inputs, ref, ref_ids, ref_step_logits = reference(hf_model, hf_proc, path, kind)
    if kind == "two_images":  # the split-KV decode path runs at both tile sizes (see TRITON_IMAGE_SIZE)
        assert inputs["input_ids"].shape[1] > PAGED_SPLIT_TOKENS

    ours = llm.prompt_logits(conv, params=params)
    assert llm.processor(conv, max_num_tiles=MAX_TILES).input_ids == inputs["input_ids"][0].tolist()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= ATOL

    out = llm.generate(conv, params)[0]
    assert out.token_ids == ref_ids
    assert out.logits.shape == ref_step_logits.shape
    assert (out.logits - ref_step_logits).abs().max().item() <= ATOL
    assert out.finish_reason == "length" and out.metrics.generated_tokens == 16


@pytest.mark.parametrize("variant", ["300m", "llama-300m"])
def test_dynamic_ntk_rope_past_max_position_embeddings(hf_checkpoint, variant):
    """max_position_embeddings 160 with a ~290-token prompt: both prefill and decode use the rescaled base (for the
    Llama decoder, over its own head_dim of 24)."""
    path, hf_model = hf_checkpoint(variant, max_position_embeddings=160)
    llm = LLM(path, dtype="float32", device="cpu")
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(64, 64, 5)},
                                         {"type": "text", "text": "Describe this image in detail."}]}]
    inputs = hf_inputs(make_hf_processor(path), conv, 1)
    assert inputs["input_ids"].shape[1] > 160
    params = SamplingParams(max_tokens=16, return_logits=True, ignore_eos=True, max_num_tiles=1)
    assert (llm.prompt_logits(conv, params=params) - hf_logits(hf_model, inputs)).abs().max().item() <= ATOL
    out = llm.generate(conv, params)[0]
    ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 16)
    assert out.token_ids == ref_ids
    assert (out.logits - ref_step_logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("variant", ["300m", "llama-300m", "qwen3-6b"])
def test_batch_matches_single_requests(hf_checkpoint, variant):
    path, _ = hf_checkpoint(variant)
    llm = LLM(path, dtype="float32", device="cpu")
    batch = [CONVERSATIONS["text"], CONVERSATIONS["one_image"], CONVERSATIONS["two_images"]]
    params = SamplingParams(max_tokens=16, ignore_eos=True, return_logits=True, max_num_tiles=MAX_TILES)
    together = llm.generate(batch, params)
    for conv, out in zip(batch, together):
        alone = llm.generate(conv, params)[0]
        assert out.token_ids == alone.token_ids
        assert out.prompt_token_ids == alone.prompt_token_ids
        assert (out.logits - alone.logits).abs().max().item() <= ATOL


def test_stream_deltas_join_to_text(hf_checkpoint):
    path, _ = hf_checkpoint("300m")
    llm = LLM(path, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    stream = llm.stream(CONVERSATIONS["one_image"], params)
    text = "".join(stream)
    full = llm.generate(CONVERSATIONS["one_image"], params)[0]
    assert stream.output.token_ids == full.token_ids
    assert text == full.text == llm.processor.tokenizer.decode(full.token_ids)
    m = stream.output.metrics
    assert m.prompt_tokens == len(full.prompt_token_ids) and m.generated_tokens == 12
    assert m.ttft_s > 0 and m.prefill_s > 0 and m.vision_s > 0 and m.decode_s > 0 and m.tpot_s > 0


def test_seeded_sampling_is_reproducible(hf_checkpoint):
    path, _ = hf_checkpoint("300m")
    llm = LLM(path, dtype="float32", device="cpu")
    conv = CONVERSATIONS["text"]
    a = llm.generate(conv, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234))[0]
    b = llm.generate(conv, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234))[0]
    c = llm.generate(conv, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=4321))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_conditions(hf_checkpoint):
    path, _ = hf_checkpoint("300m")
    llm = LLM(path, dtype="float32", device="cpu")
    conv = CONVERSATIONS["text"]
    free = llm.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = llm.generate(conv, SamplingParams(max_tokens=8, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    # eos is whatever the model produces first: make the first greedy token the eos and check we stop on it
    llm.eos_token_ids = {free.token_ids[0]}
    out = llm.generate(conv, SamplingParams(max_tokens=8))[0]
    assert out.token_ids == free.token_ids[:1] and out.finish_reason == "stop"
    out = llm.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == free.token_ids and out.finish_reason == "length"
