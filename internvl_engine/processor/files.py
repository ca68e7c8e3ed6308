"""Write an InternVL3 -hf processor/tokenizer file set into a checkpoint directory (spec sections 6-7)."""

from __future__ import annotations

import json
from pathlib import Path

from .images import IMAGENET_MEAN, IMAGENET_STD
from .template import DEFAULT_CHAT_TEMPLATE
from .tokenizer import (
    CONTEXT_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    START_IMAGE_TOKEN,
    VIDEO_TOKEN,
    build_internvl3_tokenizer_json,
)


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processor_files(dst_dir, tile_size: int = 448, image_seq_length: int = 256, model_max_length: int = 8192) -> None:
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_internvl3_tokenizer_json()
    _dump(dst / "tokenizer.json", tok)

    named = {
        "start_image_token": START_IMAGE_TOKEN,
        "end_image_token": END_IMAGE_TOKEN,
        "context_image_token": CONTEXT_IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }
    added_decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tok["added_tokens"]
    }
    _dump(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_decoder,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "errors": "replace",
            # transformers 5.x turns a dict of named extra special tokens into tokenizer attributes
            # (tokenizer.start_image_token / start_image_token_id ...), which InternVLProcessor reads.
            "extra_special_tokens": named,
            **named,
            "model_max_length": model_max_length,
            "split_special_tokens": False,
            "processor_class": "InternVLProcessor",
            "tokenizer_class": "Qwen2Tokenizer",
        },
    )
    (dst / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    # Both processors resize bicubically to one tile and normalise with ImageNet statistics.
    common = {"processor_class": "InternVLProcessor", "size": {"height": tile_size, "width": tile_size},
              "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True}
    _dump(dst / "preprocessor_config.json", {"image_processor_type": "GotOcr2ImageProcessorFast", **common,
                                             "crop_to_patches": False, "min_patches": 1, "max_patches": 12})
    _dump(dst / "processor_config.json", {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"})
    _dump(dst / "video_preprocessor_config.json", {"video_processor_type": "InternVLVideoProcessor", **common,
                                                   "do_sample_frames": False, "initial_shift": True})
