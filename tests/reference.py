"""Running the transformers reference on the same conversation as the engine."""
from __future__ import annotations

import numpy as np
import torch


def strip_media(conversation):
    """The conversation with media items reduced to bare {"type": ...} placeholders, plus the media in order."""
    images, videos, msgs = [], [], []
    for m in conversation:
        if isinstance(m["content"], str):
            msgs.append(m)
            continue
        items = []
        for it in m["content"]:
            if it["type"] == "image":
                images.append(it["image"])
            elif it["type"] == "video":
                videos.append(np.stack(it["video"]))
            items.append({"type": it["type"], **({"text": it["text"]} if it["type"] == "text" else {})})
        msgs.append({"role": m["role"], "content": items})
    return msgs, images, videos


def hf_inputs(processor, conversation, max_num_tiles=12):
    msgs, images, videos = strip_media(conversation)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt",
                     max_patches=max_num_tiles)


@torch.no_grad()
def hf_logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits[0].float()


@torch.no_grad()
def hf_greedy(model, inputs, n: int):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return ids, torch.stack([l[0].float() for l in out.logits])
