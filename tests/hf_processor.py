"""Reference transformers InternVLProcessor for parity tests (PIL image backend, torchvision video backend)."""

from __future__ import annotations

from pathlib import Path


def make_hf_processor(checkpoint_dir):
    """InternVLProcessor built from the files write_processor_files put in checkpoint_dir, offline."""
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
    import json

    image_seq_length = 256
    pc = d / "processor_config.json"
    if pc.is_file():
        image_seq_length = json.loads(pc.read_text()).get("image_seq_length", 256)
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=chat_template,
    )
