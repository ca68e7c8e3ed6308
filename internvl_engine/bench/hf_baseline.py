"""transformers' InternVL as the in-process baseline of the benchmark harness (`--baseline hf`).

transformers is a benchmark/test dependency, never the engine's: it is imported only inside these functions.

Timing of a batch: one `processor(...)` + `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` call over
B conversations (left padding), with a streamer that only notes when generate hands it each step's tokens (after
their copy to the host, so the device has produced them):
- TTFT = from the processor call to the first new tokens;
- end-to-end = the whole call; every request of the batch finishes with it, so each gets that e2e;
- TPOT = (last tokens - first tokens) / (N - 1).
All three come from the same call, so TPOT cannot go negative on a loaded machine, as the difference of two calls'
wall times (a 1-token generate for TTFT, then the full one) did.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import torch

from ..config import RANDOM_PREFIX, preset_config
from ..constants import IMAGE_SEQ_LENGTH
from ..loader import export_hf_state_dict
from ..processor.tokenizer import builtin_tokenizer_json
from ..quant.writer import dense_twin
from .common import sync


def raw_config(model: str) -> dict:
    """config.json contents of `--model` (a random preset or a checkpoint directory)."""
    if model.startswith(RANDOM_PREFIX):
        return preset_config(model[len(RANDOM_PREFIX):])
    return json.loads((Path(model) / "config.json").read_text())


_EXPERT_KEY = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fused_experts(state: dict) -> dict:
    """`state` with each MoE layer's per-expert tensors (the checkpoints' form, which export_hf_state_dict writes)
    stacked into the two 3-D parameters transformers 5's Qwen3MoeExperts holds: gate_up_proj [E, 2F, Hd] (each
    expert's gate_proj rows, then its up_proj rows: the forward chunks it in that order) and down_proj [E, Hd, F]."""
    out, layers = {}, {}
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = t
        else:
            layers.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for prefix, proj in layers.items():
        experts = range(len(proj["down_proj"]))
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([proj["gate_proj"][e], proj["up_proj"][e]])
                                                    for e in experts])
        out[f"{prefix}.down_proj"] = torch.stack([proj["down_proj"][e] for e in experts])
    return out


def hf_model_like(llm, raw: dict):
    """transformers' InternVLForConditionalGeneration holding exactly `llm`'s weights (same device and dtype)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    # a quantized model's baseline is transformers on its dense twin (the dequantized weights): transformers'
    # InternVL has no AWQ / compressed-tensors path of its own that runs these files faithfully
    skip = ("architectures", "model_type", "quantization_config")
    cfg = InternVLConfig(**{k: v for k, v in raw.items() if k not in skip})
    with torch.device(llm.device):
        model = InternVLForConditionalGeneration(cfg).to(llm.dtype)
    state = {}
    for key, t in fused_experts(dense_twin(export_hf_state_dict(llm.model), llm.dtype)).items():
        if key.startswith("language_model.lm_head."):
            key = key[len("language_model."):]
        elif key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        else:
            key = "model." + key
        state[key] = t
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def make_processor(max_patches: int, tokenizer_json: dict | None = None):
    """InternVLProcessor (PIL image processor) built offline from the files the engine writes for a checkpoint
    (with `tokenizer_json`, that tokenizer: a random preset's)."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from ..processor.files import write_processor_files

    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(tmp, tokenizer_json=tokenizer_json)
        d = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(tmp, local_files_only=True)
        video_processor = InternVLVideoProcessor.from_pretrained(tmp, local_files_only=True)
        tpl = d / "chat_template.jinja"
        chat_template = tpl.read_text(encoding="utf-8") if tpl.is_file() else None
        pc = d / "processor_config.json"
        image_seq_length = json.loads(pc.read_text()).get("image_seq_length", IMAGE_SEQ_LENGTH) if pc.is_file() \
            else IMAGE_SEQ_LENGTH
    proc = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=image_seq_length, chat_template=chat_template)
    proc.image_processor.max_patches = max(1, max_patches)
    proc.tokenizer.padding_side = "left"
    return proc


class HFBaseline:
    def __init__(self, llm, model: str, max_patches: int):
        self.device, self.dtype = llm.device, llm.dtype
        self.model = hf_model_like(llm, raw_config(model))
        random = model.startswith(RANDOM_PREFIX)  # the engine's built-in tokenizer, InternVL3's or 3.5's
        self.processor = make_processor(max_patches, builtin_tokenizer_json(llm.config) if random else None)

    def _texts(self, conversations) -> tuple[list[str], list]:
        texts, images = [], []
        for conv in conversations:
            msgs = []
            for m in conv:
                content = []
                for part in m["content"]:
                    if part["type"] == "image":
                        content.append({"type": "image"})
                        images.append(part["image"])
                    else:
                        content.append(part)
                msgs.append({"role": m["role"], "content": content})
            texts.append(self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return texts, images

    @torch.inference_mode()
    def _generate(self, conversations, new_tokens: int):
        """(seconds of the whole call, the times of its token hand-overs from t0, each request's new ids)."""
        clock = _TokenClock()
        sync(self.device)
        t0 = time.perf_counter()
        texts, images = self._texts(conversations)
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt",
                                padding=len(texts) > 1)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  streamer=clock)
        sync(self.device)
        dt = time.perf_counter() - t0
        prompt_len = inputs["input_ids"].shape[1]
        return dt, [t - t0 for t in clock.times], out[:, prompt_len:].tolist()

    def run_batch(self, conversations, new_tokens: int) -> dict:
        """One batch, one generate: TTFT, end-to-end and TPOT seconds (module docstring) and each request's ids."""
        e2e, times, ids = self._generate(conversations, new_tokens)
        # times[0]: the prompt, handed over before the prefill; times[1]: the first new tokens; times[-1]: the last
        if len(times) != new_tokens + 1:
            raise RuntimeError(f"transformers' generate handed over {len(times) - 1} steps of tokens, not {new_tokens}: "
                               "its streamer protocol changed; TTFT and TPOT cannot be read from it")
        ttft = times[1]
        return {"ttft_s": ttft, "e2e_s": e2e, "tpot_s": (times[-1] - ttft) / max(1, new_tokens - 1), "ids": ids}


class _TokenClock:
    """transformers' streamer protocol (put, end), noting only when each put happens."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass
