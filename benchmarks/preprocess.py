"""Host preprocessing per request: LLMEngine.make_sequence (image load, tiling, resize, normalise, chat template,
tokenise, media content key), the part of TTFT that runs on the CPU before any kernel. Random RGB images of one
size; prints the median time per request, and for a batch (LLM.generate's path, spread over threads) the time of
the whole batch against its requests one after another; writes a JSON record.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="1,12", help="comma-separated max_num_tiles values")
    ap.add_argument("--size", default="1024x768", help="image width x height")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="requests preprocessed together (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    llm = LLM("random:tiny", dtype="float32", device="cpu")
    engine = llm.engine
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
        row = {"max_num_tiles": tiles, "tiles": n, "median_s": med, "times_s": times}
        print(f"{w}x{h} image, max_num_tiles {tiles} ({n} tiles): {med * 1e3:.2f} ms per request "
              f"({med * 1e3 / n:.2f} ms per tile), median of {len(times)}")
        if args.batch:
            group = (convs * -(-args.batch // len(convs)))[:args.batch]
            together, alone = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                llm._sequences(group, params)
                together.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for c in group:
                    llm._sequences(c, params)
                alone.append(time.perf_counter() - t0)
            row["batch"] = {"requests": args.batch, "together_s": min(together), "one_by_one_s": min(alone)}
            print(f"  batch of {args.batch}: {min(together) * 1e3:.1f} ms together, {min(alone) * 1e3:.1f} ms one by "
                  f"one ({min(alone) / min(together):.2f}x, best of 3)")
        results.append(row)
    write_record(args.json, {**metadata(torch.device("cpu")), "size": [w, h], "results": results})


if __name__ == "__main__":
    main()
