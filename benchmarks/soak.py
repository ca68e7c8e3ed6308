"""Soak test of the serving engine's failure model: a seeded mix of requests from threads and asyncio, with aborts
and cancellations at random points, hostile media, injected faults at every stage and a KV pool small enough to
preempt; and the hostile callers of issue 3.0: request ids that collide with another request's sample names
(`x` with n=2 beside `x#1`), consumers that stop reading, extreme media (a 40,000,000 x 1 PNG, an ICO, a video of
9000 x 9000 frames, a URL whose server trickles its headers) and stop lists of 2000 x 5000 characters. Every request
must end (no hang), the pool must end clean, the engine loop must stay alive, every good request's tokens must equal
what it gets alone, and the process's RSS after the run must be within 10 % of before it.

    python benchmarks/soak.py --requests 500 --json benchmarks/results/<date>-cpu-<commit>-soak.json

Prints and writes: requests, by kind and outcome, faults, aborts, cancellations, preemptions, isolation reruns, and
the loss columns: lost, leaked_blocks, dead_threads, good_mismatched, rss_growth (over 10 %)."""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import base64
import ctypes
import dataclasses
import gc
import io
import os
import random
import socket
import socketserver
import subprocess
import tempfile
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM
from internvl_engine.engine.faults import STAGES
from internvl_engine.errors import InternVLEngineError, RequestFailedError, SlowConsumerError
from internvl_engine.processor import MediaPolicy

SETTINGS = dict(device="cpu", kv_cache_tokens=1024, max_num_seqs=12, vision_cache_bytes=8 << 20,
                consumer_timeout_s=1.0)
FAULT_STAGES = [s for s in STAGES if s not in ("preprocess",)]
KINDS = ("good", "good", "good", "good", "good", "hostile", "fault", "abort", "cancel",
         "collide", "stall", "media", "stoplist")


def conversations(k: int) -> list:
    rng = np.random.default_rng(0)
    convs = []
    for i in range(k):
        if i % 2:
            convs.append(f"Soak question {i}: tell me about rivers.")
        else:
            img = Image.fromarray(rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8))
            convs.append([{"role": "user", "content": [{"type": "image", "image": img},
                                                       {"type": "text", "text": f"Soak picture {i}."}]}])
    return convs


HOSTILE = [
    [{"role": "user", "content": [{"type": "image", "image": np.zeros((0, 4, 3), np.uint8)},
                                  {"type": "text", "text": "empty"}]}],
    [{"role": "user", "content": [{"type": "image", "url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                                  {"type": "text", "text": "garbage"}]}],
    [{"role": "user", "content": [{"type": "audio"}]}],
]


class _TrickleHeaders(socketserver.BaseRequestHandler):
    """An HTTP server that sends its status line and then one header byte every 0.2 s, forever: a fetch deadline
    must cover the headers, not only each read."""

    def handle(self):
        try:
            self.request.sendall(b"HTTP/1.1 200 OK\r\n")
            while True:
                self.request.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass


def hostile_media(root: Path, url: str) -> list:
    """Extreme media (issue 3.0 items 3-5, 7): each must be refused from its header, cheaply."""
    thin = io.BytesIO()
    Image.new("L", (40_000_000, 1)).save(thin, "PNG")  # 52 KB; decoding it whole took 7.7 GB before
    ico = root / "icon.ico"
    Image.new("RGB", (256, 256)).save(ico, "ICO", sizes=[(256, 256)])
    video = root / "huge-frames.mkv"
    import av
    with av.open(str(video), "w") as out:  # 9000 x 9000 frames, a few KB: a solid colour compresses to nothing
        stream = out.add_stream("ffv1", rate=1)
        stream.width = stream.height = 9000
        stream.pix_fmt = "gray"
        frame = av.VideoFrame.from_ndarray(np.zeros((9000, 9000), np.uint8), format="gray")
        for _ in range(2):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))

    def image(part):
        return [{"role": "user", "content": [part, {"type": "text", "text": "hostile"}]}]
    return [image({"type": "image", "url": "data:image/png;base64," + base64.b64encode(thin.getvalue()).decode()}),
            image({"type": "image", "url": str(ico)}),
            [{"role": "user", "content": [{"type": "video", "url": str(video)}, {"type": "text", "text": "hostile"}]}],
            image({"type": "image", "url": url})]


def rss_mb() -> float:
    """Resident MB after a collection, with glibc asked to hand its free pages back: what is still held, not what
    the allocator keeps for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=16 + 8 * (i % 5), ignore_eos=True, max_num_tiles=1)  # growth preempts


class Soak:
    def __init__(self, args):
        self.args, self.rng = args, random.Random(args.seed)
        self.convs = conversations(args.distinct)
        self.tmp = tempfile.TemporaryDirectory(prefix="soak-media-")
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TrickleHeaders)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"
        self.media = hostile_media(Path(self.tmp.name), url)
        # the server's policy, opened for this run's own files and its loopback server, with a short fetch deadline
        policy = MediaPolicy.strict(local_media_root=self.tmp.name, allow_private_networks=True, fetch_timeout_s=1.0)
        settings = dict(SETTINGS, media_policy=policy)
        alone = LLM("random:tiny", **settings)
        self.alone = [alone.generate(c, params(i))[0].token_ids for i, c in enumerate(self.convs)]
        del alone
        self.engine = AsyncLLM("random:tiny", **settings)
        self.plan = [(n, self.rng.choice(KINDS), self.rng.randrange(args.distinct), self.rng.random())
                     for n in range(args.warmup + args.requests)]
        self.outcomes: dict[int, str] = {}
        self.mismatched = 0
        self.lock = threading.Lock()

    def record(self, n: int, outcome: str, kind: str, conv: int, tokens=None) -> None:
        with self.lock:
            self.outcomes[n] = f"{kind}:{outcome}"
            if kind.startswith("good") and (outcome != "ok" or tokens != self.alone[conv]):
                self.mismatched += 1

    def prepare(self, n: int, kind: str, conv: int):
        rid = f"soak-{n}"
        if kind == "fault":
            self.engine.engine.inject_fault(rid, FAULT_STAGES[n % len(FAULT_STAGES)])
        source = {"hostile": HOSTILE, "media": self.media}.get(kind)
        source = source[n % len(source)] if source else self.convs[conv]
        return rid, source

    def kind_params(self, kind: str, conv: int) -> SamplingParams:
        if kind == "stoplist":  # 2000 stop strings of 5000 characters: refused before any work
            return SamplingParams(max_tokens=8, stop=[f"{i:05d}" * 1000 for i in range(2000)])
        if kind == "stall":  # long enough to outlive the consumer timeout while its consumer sleeps
            return dataclasses.replace(params(conv), max_tokens=200)
        return params(conv)

    def collide(self, n: int, conv: int) -> None:
        """`x` with n=2 (its second sample was once named `x#1` inside the engine), then a request named `x#1`:
        both must be served, and the second is an ordinary good request."""
        rid = f"soak-{n}"
        twin = self.engine.submit(self.convs[conv], dataclasses.replace(params(conv), n=2), request_id=rid)
        try:
            out = self.engine.submit(self.convs[conv], params(conv), request_id=f"{rid}#1").result(timeout=120)
            self.record(n, "ok" if out.finish_reason == "length" else out.finish_reason, "good-collide", conv,
                        out.token_ids)
            twin.result(timeout=120)
        except RequestFailedError:
            self.record(n, "error", "good-collide", conv)

    # -------------------------------------------------------------- threads
    def run_thread(self, n, kind, conv, x) -> None:
        if kind == "collide":
            return self.collide(n, conv)
        rid, source = self.prepare(n, kind, conv)
        try:
            future = self.engine.submit(source, self.kind_params(kind, conv), request_id=rid)
        except InternVLEngineError:
            return self.record(n, "refused", kind, conv)
        if kind in ("cancel", "abort"):
            time.sleep(x * 0.05)
            future.cancel() if kind == "cancel" else self.engine.abort(rid)
        try:
            out = future.result(timeout=120)
            self.record(n, "ok" if out.finish_reason == "length" else out.finish_reason, kind, conv, out.token_ids)
        except CancelledError:
            self.record(n, "cancelled", kind, conv)
        except RequestFailedError:
            self.record(n, "error", kind, conv)

    # -------------------------------------------------------------- asyncio
    async def run_task(self, n, kind, conv, x) -> None:
        rid, source = self.prepare(n, kind, conv)
        stop_after = 1 + int(x * 3) if kind in ("cancel", "abort") else None
        tokens, finish = None, None
        if kind == "collide":
            return await asyncio.to_thread(self.collide, n, conv)
        try:
            seen = 0
            async for out in self.engine.generate(source, self.kind_params(kind, conv), rid):
                seen += 1
                tokens, finish = out.token_ids, out.finish_reason
                if kind == "stall" and not out.finished:  # stops reading: the engine must abort it
                    await asyncio.sleep(3 * SETTINGS["consumer_timeout_s"])
                if stop_after is not None and seen >= stop_after and not out.finished:
                    if kind == "abort":
                        self.engine.abort(rid)
                    else:
                        finish = "cancelled"
                        break  # leaving the generator aborts the request
            self.record(n, "ok" if finish == "length" else f"{finish}", kind, conv, tokens)
        except RequestFailedError as e:
            self.record(n, "slow-aborted" if isinstance(e.__cause__, SlowConsumerError) else "error", kind, conv)
        except InternVLEngineError:
            self.record(n, "refused", kind, conv)

    def run_plan(self, plan) -> list[threading.Thread]:
        """Even-numbered items from threads (submit), odd ones as asyncio tasks (generate); the threads, joined."""
        threaded = [it for it in plan if it[0] % 2 == 0]
        tasks = [it for it in plan if it[0] % 2 == 1]
        workers = []
        for w in range(self.args.threads):
            mine = threaded[w::self.args.threads]
            workers.append(threading.Thread(target=lambda m=mine: [self.run_thread(*it) for it in m]))
        for t in workers:
            t.start()
        asyncio.run(self.run_async(tasks))
        for t in workers:
            t.join(timeout=300)
        return workers

    async def run_async(self, items) -> None:
        window = asyncio.Semaphore(self.args.concurrency)

        async def one(item):
            async with window:
                await self.run_task(*item)
        await asyncio.gather(*(one(it) for it in items))

    def run(self) -> dict:
        # the first `warmup` requests bring the service to its steady state (thread pools, caches, allocator arenas);
        # RSS is compared from there to the end of the run
        t0 = time.perf_counter()
        workers = self.run_plan(self.plan[:self.args.warmup])
        rss_before = rss_mb()
        workers += self.run_plan(self.plan[self.args.warmup:])
        deadline = time.time() + 60
        while self.engine.engine.has_unfinished_requests() and time.time() < deadline:
            time.sleep(0.05)
        eng, bm = self.engine.engine, self.engine.engine.block_manager
        bm.check_invariants()
        stats = eng.stats()
        rss_after = rss_mb()
        counts: dict[str, int] = {}
        for o in self.outcomes.values():
            counts[o] = counts.get(o, 0) + 1
        result = {
            "requests": len(self.plan), "warmup": self.args.warmup, "wall_s": round(time.perf_counter() - t0, 1), "outcomes": counts,
            "faults_injected": sum(k == "fault" for _, k, _, _ in self.plan),
            "aborts": sum(k == "abort" for _, k, _, _ in self.plan),
            "cancellations": sum(k == "cancel" for _, k, _, _ in self.plan),
            "hostile": sum(k == "hostile" for _, k, _, _ in self.plan),
            "hostile_callers": {k: sum(x == k for _, x, _, _ in self.plan)
                                for k in ("collide", "stall", "media", "stoplist")},
            "preemptions": stats.num_preemptions, "request_errors": stats.num_request_errors,
            "isolation_splits": stats.num_isolation_splits,
            "lost": len(self.plan) - len(self.outcomes) + int(eng.has_unfinished_requests()),
            "leaked_blocks": bm.num_blocks - bm.num_free_blocks,
            "dead_threads": sum(t.is_alive() for t in workers) + int(not self.engine._loop._thread.is_alive()),
            "good_mismatched": self.mismatched,
            "rss_before_mb": round(rss_before), "rss_after_mb": round(rss_after),
            "rss_growth": round(rss_after / rss_before - 1, 3),
        }
        self.engine.shutdown()
        self.server.shutdown()
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50, help="requests of the same mix run first; RSS is measured after")
    ap.add_argument("--distinct", type=int, default=12, help="distinct good conversations (solo runs as reference)")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=24, help="asyncio requests in flight at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = Soak(args).run()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = {"schema": "internvl-engine/soak/1", "date": time.strftime("%Y-%m-%d"),
              "device": f"{platform.machine()} CPU", "commit": commit,
              "command": "python " + " ".join(["benchmarks/soak.py"] + sys.argv[1:]), "settings": SETTINGS, **result}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    bad = {k: record[k] for k in ("lost", "leaked_blocks", "dead_threads", "good_mismatched") if record[k]}
    if record["rss_growth"] > 0.10:
        bad["rss_growth"] = record["rss_growth"]
    if bad:
        raise SystemExit(f"soak: losses {bad}")


if __name__ == "__main__":
    main()
