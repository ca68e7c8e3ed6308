"""End to end on a checkpoint whose tiles are not 448: a tiny model with vision image_size 224 (64 tokens per tile),
model and processor both written by transformers' save_pretrained (processor settings nested in
processor_config.json, non-default tiling limits and statistics). The engine must read those settings and match
transformers' prompt logits and greedy tokens. CPU only."""

from __future__ import annotations

import pytest

from checkpoints import build_hf_checkpoint_with_hf_processor
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits, strip_media
from test_model_parity import CONVERSATIONS as PARITY_CONVERSATIONS

from internvl_engine import LLM, Processor, SamplingParams

ATOL = 1e-4
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


# the parity suite's image conversations, on a checkpoint with other tiles
CONVERSATIONS = {k: PARITY_CONVERSATIONS[k] for k in ("one_image", "two_images")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-224")
    hf_model, _ = build_hf_checkpoint_with_hf_processor(path, "300m", image_size=224, max_patches=6,
                                                        image_mean=MEAN, image_std=STD)
    return path, hf_model, make_hf_processor(path), LLM(str(path), device="cpu", dtype="float32")


def test_settings_come_from_the_saved_files(checkpoint):
    path, _, _, llm = checkpoint
    assert not (path / "preprocessor_config.json").exists()
    p = llm.processor
    assert (p.tile_size, p.image_seq_length, p.max_tiles) == (224, 64, 6)
    assert p.image_mean == pytest.approx(MEAN) and p.image_std == pytest.approx(STD)
    assert llm.config.vision.image_size == 224 and llm.config.image_seq_length == 64
    agreed = Processor.from_pretrained(path, model_config=llm.config)  # what the engine builds once it passes it
    assert (agreed.tile_size, agreed.image_seq_length, agreed.max_tiles) == (224, 64, 6)


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_greedy_matches_transformers(checkpoint, kind):
    _, hf_model, hf_proc, llm = checkpoint
    conv = CONVERSATIONS[kind]
    # the checkpoint's own max_patches (6) on both sides: no per-request limit
    msgs, images, _ = strip_media(conv)
    text = hf_proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = hf_proc(text=[text], images=images, return_tensors="pt")
    enc = llm.processor(conv)
    assert enc.input_ids == inputs["input_ids"][0].tolist()
    assert (enc.pixel_values - inputs["pixel_values"]).abs().max().item() <= 1e-6
    assert enc.pixel_values.shape[-1] == 224 and max(enc.num_patches) > 1

    params = SamplingParams(max_tokens=16, return_logits=True, ignore_eos=True)
    ours = llm.prompt_logits(conv, params=params)
    assert (ours - hf_logits(hf_model, inputs)).abs().max().item() <= ATOL
    out = llm.generate(conv, params)[0]
    ref_ids, ref_step_logits = hf_greedy(hf_model, inputs, 16)
    assert out.token_ids == ref_ids
    assert (out.logits - ref_step_logits).abs().max().item() <= ATOL


def test_per_request_tile_limit(checkpoint):
    _, hf_model, hf_proc, llm = checkpoint
    conv = CONVERSATIONS["one_image"]
    inputs = hf_inputs(hf_proc, conv, 2)
    params = SamplingParams(max_tokens=8, ignore_eos=True, max_num_tiles=2)
    assert llm.processor(conv, max_num_tiles=2).input_ids == inputs["input_ids"][0].tolist()
    assert llm.generate(conv, params)[0].token_ids == hf_greedy(hf_model, inputs, 8)[0]
