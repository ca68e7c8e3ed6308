"""Host preprocessing per request: LLMEngine.make_sequence (image load, tiling, resize, normalise, chat template,
tokenise, media content key), the part of TTFT that runs on the CPU before any kernel. Random RGB images of one
size; prints the median time per request, and for a batch (LLM.generate's path, spread over threads) the time of
the whole batch against its requests one after another; writes a JSON record. Each pixel path runs in the same
process: `native` (resize and tile normalisation in the C++ extension) and `pil` (Pillow's resize, numpy), the
baseline it replaces; both give the same bytes (tests/test_images.py).

  python benchmarks/preprocess.py --tiles 1,6,12 --json out.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.bench.common import metadata, write_record
from internvl_engine.processor import images as image_ops


def measure(llm, convs, params, batch: int) -> dict:
    """Median time of one request's make_sequence, and a batch of `batch` requests together vs one by one."""
    engine = llm.engine
    engine.make_sequence("warm", convs[0], params, 0.0, "warm")
    times, n = [], 0
    for c in convs:
        t0 = time.perf_counter()
        seq = engine.make_sequence("x", c, params, 0.0, "x")
        times.append(time.perf_counter() - t0)
        n = seq.pixel_values.shape[0]
    row = {"tiles": n, "median_s": statistics.median(times), "times_s": times}
    if batch:
        group = (convs * -(-batch // len(convs)))[:batch]
        together, alone = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            llm._sequences(group, params)
            together.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for c in group:
                llm._sequences(c, params)
            alone.append(time.perf_counter() - t0)
        row["batch"] = {"requests": batch, "together_s": min(together), "one_by_one_s": min(alone)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="1,12", help="comma-separated max_num_tiles values")
    ap.add_argument("--size", default="1024x768", help="image width x height")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="requests preprocessed together (0: skip)")
    ap.add_argument("--paths", default="native,pil", help="pixel paths to time: native (C++ extension), pil")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    paths = args.paths.split(",")
    if "native" in paths and image_ops.native_images() is None:
        raise SystemExit("the native pixel path is unavailable (C++ extension not built); pass --paths pil")
    llm = LLM("random:tiny", dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.requests)]
    convs = [[{"role": "user", "content": [{"type": "image", "image": im},
                                           {"type": "text", "text": "Describe the picture."}]}] for im in images]
    results = []
    for tiles in (int(t) for t in args.tiles.split(",")):
        params = SamplingParams(max_tokens=1, max_num_tiles=tiles)
        rows = {}
        for path in paths:
            with image_ops.native_pixels(path == "native"):
                row = rows[path] = {"path": path, "max_num_tiles": tiles, **measure(llm, convs, params, args.batch)}
            med, n = row["median_s"], row["tiles"]
            line = (f"{w}x{h} image, max_num_tiles {tiles} ({n} tiles), {path}: {med * 1e3:.2f} ms per request "
                    f"({med * 1e3 / n:.2f} ms per tile), median of {len(row['times_s'])}")
            if "batch" in row:
                b = row["batch"]
                line += (f"; batch of {b['requests']}: {b['together_s'] * 1e3:.1f} ms together, "
                         f"{b['one_by_one_s'] * 1e3:.1f} ms one by one")
            print(line)
            results.append(row)
        if {"native", "pil"} <= rows.keys():
            print(f"  native vs pil: {rows['pil']['median_s'] / rows['native']['median_s']:.2f}x per request")
    write_record(args.json, {**metadata(torch.device("cpu")), "size": [w, h], "results": results})


if __name__ == "__main__":
    main()
