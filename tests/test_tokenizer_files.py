"""`internvl-engine tokenizer --model M --out DIR` writes the files transformers' AutoTokenizer.from_pretrained(DIR)
loads (what guidellm and `vllm bench serve` take by path, there being no hub id for a served model), and the
tokenizer loaded from them is the engine's: the same ids for text and special tokens, the same decoded text, the same
end token, and the same rendered chat prompt. Both built-in vocabularies: InternVL3's (Qwen2.5) and InternVL3.5's
(Qwen3); config.json only, no weights."""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from internvl_engine.cli import main  # noqa: E402
from internvl_engine.config import load_model_config  # noqa: E402
from internvl_engine.processor import Processor  # noqa: E402
from internvl_engine.processor.tokenizer import builtin_tokenizer_json  # noqa: E402

TEXTS = ["Hello world", "  leading spaces\tand tabs\n\nnew lines", "naïve café — 東京 🙂",
         "<img><IMG_CONTEXT></img> a picture", "<|im_start|>user\nhi<|im_end|>", "x" * 300]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]


@pytest.mark.parametrize("preset", ["random:tiny", "random:internvl3_5-1b"])
def test_autotokenizer_loads_the_engines_tokenizer(preset, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "--model", preset, "--out", str(out)]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    config, _ = load_model_config(preset)
    processor = Processor.from_parts(builtin_tokenizer_json(config), None, model_config=config)
    ours = processor.tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert hf.eos_token_id == ours.eos_token_id and hf.pad_token_id == ours.pad_token_id
    assert hf.convert_tokens_to_ids("<IMG_CONTEXT>") == config.image_token_id
    assert len(hf) == ours.vocab_size
    assert hf.model_max_length == config.max_model_len
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        processor.apply_chat_template(CONVERSATION)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == processor.template.source and cfg["eos_token"] == "<|im_end|>"


def test_a_model_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert main(["tokenizer", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "tok")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "tok").exists()
