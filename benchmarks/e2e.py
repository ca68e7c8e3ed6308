"""End-to-end latency: ours vs transformers on the very same weights and inputs, in one process.

    python benchmarks/e2e.py --model random:internvl3-1b --device cuda --tiles 1 --output-tokens 32 --baseline hf \
        --json out.json

TTFT = request in -> first token out (preprocess + vision + prefill); TPOT = (end-to-end - TTFT) / (n - 1).
Each figure is the median of --repeat timed runs after one warm-up. The benchmark-harness issue extends this with
floors, percentiles, concurrency and plots."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from internvl_engine import LLM, SamplingParams  # noqa: E402
from internvl_engine.loader import export_hf_state_dict  # noqa: E402


def _image_for_tiles(tiles: int) -> Image.Image:
    """An image whose aspect ratio selects `tiles` tiles (1 tile, or a cols x 1 grid plus the thumbnail)."""
    cols = 1 if tiles == 1 else tiles - 1
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (448, 448 * cols, 3), dtype=np.uint8))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_model_like(llm: LLM, raw_config: dict):
    """transformers' InternVLForConditionalGeneration holding exactly our weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(**{k: v for k, v in raw_config.items() if k not in ("architectures", "model_type")})
    with torch.device(llm.device):
        model = InternVLForConditionalGeneration(cfg).to(llm.dtype)
    state = {}
    for key, t in export_hf_state_dict(llm.model).items():
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


def time_ours(llm, conv, params, repeat):
    llm.generate(conv, params)  # warm-up
    runs = []
    for _ in range(repeat):
        out = llm.generate(conv, params)[0]
        m = out.metrics
        runs.append(dict(ttft_s=m.ttft_s, tpot_s=(m.e2e_s - m.ttft_s) / max(1, m.generated_tokens - 1),
                         e2e_s=m.e2e_s, preprocess_s=m.preprocess_s, vision_s=m.vision_s, prefill_s=m.prefill_s))
    return out, {k: statistics.median(r[k] for r in runs) for k in runs[0]}


@torch.inference_mode()
def time_hf(model, processor, conv_text, images, n, repeat, device, dtype):
    def once(new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        inputs = processor(text=[conv_text], images=images or None, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
        return time.perf_counter() - t0, out[0, inputs["input_ids"].shape[1]:].tolist()

    once(n)
    ttft = statistics.median(once(1)[0] for _ in range(repeat))
    runs = [once(n) for _ in range(repeat)]
    e2e = statistics.median(r[0] for r in runs)
    return runs[-1][1], dict(ttft_s=ttft, tpot_s=(e2e - ttft) / max(1, n - 1), e2e_s=e2e)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tiles", type=int, default=1, help="tiles of the one image (0: text only)")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", choices=["none", "hf"], default="none")
    ap.add_argument("--backend", default="auto", help="kernel backend: auto, torch, cpp, triton, cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    device = llm.device
    images = [_image_for_tiles(args.tiles)] if args.tiles else []
    content = [{"type": "image", "image": im} for im in images] + [
        {"type": "text", "text": "Describe this image in detail."}]
    conv = [{"role": "user", "content": content}]
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, max_num_tiles=max(1, args.tiles))
    out, ours = time_ours(llm, conv, params, args.repeat)
    record = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
        commit=os.environ.get("INTERNVL_ENGINE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__, model=args.model, dtype=str(llm.dtype).replace("torch.", ""),
        kernels=llm.runner.kernels,
        workload=dict(batch=1, images=len(images), tiles=out.metrics.num_tiles,
                      prompt_tokens=len(out.prompt_token_ids), output_tokens=args.output_tokens, repeat=args.repeat),
        ours=ours)
    if args.baseline == "hf":
        if args.model.startswith("random:"):
            from internvl_engine.random_model import preset_config
            raw = preset_config(args.model.split(":", 1)[1])
        else:
            raw = json.loads((Path(args.model) / "config.json").read_text())
        hf = hf_model_like(llm, raw)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hf_processor import make_hf_processor
        import tempfile
        from internvl_engine.processor.files import write_processor_files
        with tempfile.TemporaryDirectory() as d:
            write_processor_files(d)
            proc = make_hf_processor(d)
        proc.image_processor.max_patches = max(1, args.tiles)
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(images) + [
            {"type": "text", "text": "Describe this image in detail."}]}], tokenize=False, add_generation_prompt=True)
        hf_ids, base = time_hf(hf, proc, text, images, args.output_tokens, args.repeat, device, llm.dtype)
        record["baseline_hf"] = base
        record["speedup"] = {k: base[k] / ours[k] for k in ("ttft_s", "tpot_s", "e2e_s")}
        record["ids_agree"] = hf_ids == out.token_ids
        record["ids_agree_prefix"] = next((i for i, (a, b) in enumerate(zip(hf_ids, out.token_ids)) if a != b),
                                          len(hf_ids))
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
