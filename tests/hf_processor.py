"""Reference transformers InternVLProcessor for parity tests (PIL image backend, torchvision video backend)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from internvl_engine.constants import IMAGE_SEQ_LENGTH


def make_hf_processor(checkpoint_dir):
    """InternVLProcessor built offline from the processor files in checkpoint_dir (either the transformers 4 layout
    write_processor_files writes or the nested one transformers 5 saves: its from_pretrained reads both)."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    d = Path(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(d), local_files_only=True)
    video_processor = InternVLVideoProcessor.from_pretrained(str(d), local_files_only=True)
    tpl = d / "chat_template.jinja"
    chat_template = tpl.read_text(encoding="utf-8") if tpl.is_file() else None

    image_seq_length = IMAGE_SEQ_LENGTH  # InternVLProcessor's own default
    pc = d / "processor_config.json"
    if pc.is_file():
        image_seq_length = json.loads(pc.read_text()).get("image_seq_length", IMAGE_SEQ_LENGTH)
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=chat_template,
    )


def save_hf_processor(dst_dir, *, tile_size: int, image_seq_length: int, image_mean, image_std,
                      min_patches: int = 1, max_patches: int = 12, video_mean=None, video_std=None):
    """An InternVLProcessor with these settings, written by transformers' own save_pretrained into dst_dir
    (5.24: tokenizer files, chat_template.jinja and one processor_config.json with the image and video processor
    settings nested in it, no preprocessor_config.json). Returns the processor."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from internvl_engine.processor.files import write_processor_files

    size = {"height": tile_size, "width": tile_size}
    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(tmp)  # only for the tokenizer and the chat template
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        chat_template = (Path(tmp) / "chat_template.jinja").read_text(encoding="utf-8")
    image_processor = GotOcr2ImageProcessorPil(size=size, image_mean=list(image_mean), image_std=list(image_std),
                                               min_patches=min_patches, max_patches=max_patches,
                                               crop_to_patches=False)  # as the conversion script writes it
    video_processor = InternVLVideoProcessor(size=size, image_mean=list(video_mean or image_mean),
                                             image_std=list(video_std or image_std))
    proc = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=image_seq_length, chat_template=chat_template)
    proc.save_pretrained(str(dst_dir))
    return proc
