"""Host preprocessing per request: LLMEngine.make_sequence (image load, tiling, resize, normalise, chat template,
tokenise, media content key), the part of TTFT that runs on the CPU before any kernel. Random RGB images of one
size; prints the median time per request and writes a JSON record.

  python benchmarks/preprocess.py --tiles 1,6,12 --json out.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from internvl_engine import SamplingParams
from internvl_engine.bench.common import metadata, write_record
from internvl_engine.engine.llm_engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="1,12", help="comma-separated max_num_tiles values")
    ap.add_argument("--size", default="1024x768", help="image width x height")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    engine = LLMEngine("random:tiny", dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.requests)]
    results = []
    for tiles in (int(t) for t in args.tiles.split(",")):
        params = SamplingParams(max_tokens=1, max_num_tiles=tiles)
        convs = [[{"role": "user", "content": [{"type": "image", "image": im},
                                               {"type": "text", "text": "Describe the picture."}]}] for im in images]
        engine.make_sequence("warm", convs[0], params, 0.0, "warm")
        times, n = [], 0
        for c in convs:
            t0 = time.perf_counter()
            seq = engine.make_sequence("x", c, params, 0.0, "x")
            times.append(time.perf_counter() - t0)
            n = seq.pixel_values.shape[0]
        med = statistics.median(times)
        results.append({"max_num_tiles": tiles, "tiles": n, "median_s": med, "times_s": times})
        print(f"{w}x{h} image, max_num_tiles {tiles} ({n} tiles): {med * 1e3:.2f} ms per request "
              f"({med * 1e3 / n:.2f} ms per tile), median of {len(times)}")
    write_record(args.json, {**metadata(torch.device("cpu")), "size": [w, h], "results": results})


if __name__ == "__main__":
    main()
