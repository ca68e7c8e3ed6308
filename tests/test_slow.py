"""The real InternVL3-1B shape (random weights) against transformers, fp32 on the CPU. Minutes and ~12 GB of RAM,
so it is marked slow: `python -m pytest -m slow`."""
import numpy as np
import pytest
from PIL import Image

from internvl_engine import LLM, SamplingParams
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits

pytestmark = pytest.mark.slow


def test_internvl3_1b_shape_matches_transformers(hf_checkpoint):
    path, hf_model = hf_checkpoint("internvl3-1b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe this image in detail."}]}]
    inputs = hf_inputs(make_hf_processor(path), conv, 1)
    ref = hf_logits(hf_model, inputs)
    llm = LLM(path, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_logits=True, max_num_tiles=1)
    assert (llm.prompt_logits(conv, params=params) - ref).abs().max().item() <= 1e-4
    out = llm.generate(conv, params)[0]
    ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 8)
    assert out.token_ids == ref_ids
    assert (out.logits - ref_step_logits).abs().max().item() <= 1e-4
