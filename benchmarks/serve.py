"""Serving benchmark in the shape of vLLM's benchmark_serving: replays a seeded workload (text and image chat
requests, Poisson arrivals at given rates or a fixed concurrency) against the OpenAI-compatible server and against
the offline engine (AsyncLLM in this process, the same settings and requests), and reports TTFT, TPOT, inter-token
latency (p50/p90/p99), end-to-end latency, request and token throughput, and the HTTP overhead over the offline
engine, in wall time and in CPU time per output token of the thread running the event loop (the server's against
this process's driving AsyncLLM). The two sides alternate round by round, each round with fresh prompts and images
(no cross-round cache hits).

    python benchmarks/serve.py --model random:tiny --device cpu --max-concurrency 1,32 --rounds 3 \\
        --json benchmarks/results/<date>-cpu-<commit>-serve.json --plot serve.png
    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --request-rate 2,8   # a running server, HTTP only
    python benchmarks/serve.py --max-concurrency 8,32 --json-schema-ratio 0,0.5 --http-only   # structured cost

Without --base-url it starts `internvl-engine serve` on a free loopback port with the engine settings given here.
Timing is taken by the client: TTFT from sending the request to the first chunk carrying a token (offline: to the
first RequestOutput with a token), ITL between such chunks, TPOT = (e2e - TTFT) / (tokens - 1).

--json-schema-ratio: the share of requests that carry a JSON schema (response_format json_schema; offline the same
SamplingParams.structured_outputs), drawn per request from its own seeded stream so every ratio sends the same
prompts. Each ratio is a scenario of its own at each load; "structured_cost" compares each one's TPOT with the
unconstrained scenario's at the same load. Constrained requests do not set ignore_eos (a finished schema would end
them), but no BENCH_SCHEMAS schema can finish within 64 tokens."""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# JSON the benchmark's constrained requests must produce (--json-schema): nested, enums, an integer range, and an
# array of at least 32 strings (each takes a few tokens), so no constrained request can finish before
# --output-tokens 64: every request of a load runs the same length, ratio 0 or not, and the TPOT ratio is the
# constraint's cost, not a changed batch shape. "bounded" caps the strings' lengths (maxLength), which makes each
# mask inside a string much dearer to compute for llguidance (measured: a step of 32 rows, half constrained, 13.5 ms
# with "plain", 16.8 ms with "bounded", against 13.2 ms unconstrained; 2-core CPU).
def _bench_schema(bounded: bool) -> dict:
    cap = (lambda n: {"maxLength": n}) if bounded else (lambda n: {})  # noqa: E731
    return {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags", "score"],
            "properties": {"name": {"type": "string", **cap(40)},
                           "kind": {"enum": ["river", "mountain", "forest"]},
                           "tags": {"type": "array", "minItems": 32, "items": {"type": "string", **cap(20)}},
                           "score": {"type": "integer", "minimum": 0, "maximum": 100}}}


BENCH_SCHEMAS = {"plain": _bench_schema(False), "bounded": _bench_schema(True)}
WORDS = ("river mountain light window garden silver morning engine paper circle harbor forest signal winter "
         "station copper island market shadow violet thunder lantern meadow canyon").split()


# ------------------------------------------------------------------------------------------------ workload
def workload(args, round_index: int) -> list[dict]:
    """Seeded requests of one round: messages (OpenAI form), the engine's conversation and the arrival offset."""
    rng = random.Random(args.seed * 1000 + round_index)
    nrng = np.random.default_rng(args.seed * 1000 + round_index)
    srng = random.Random(args.seed * 7919 + round_index)  # which requests are constrained: its own stream
    reqs, t = [], 0.0
    for i in range(args.num_prompts):
        words = " ".join(rng.choice(WORDS) for _ in range(args.input_words))
        text = f"[{round_index}.{i}] {words}"
        if rng.random() < args.image_ratio:
            w, h = rng.choice([(64, 48), (96, 96), (160, 120)])
            from PIL import Image
            buf = io.BytesIO()
            Image.fromarray(nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": text}]}]
            conversation = [{"role": "user", "content": [{"type": "image", "url": url},
                                                         {"type": "text", "text": text}]}]
        else:
            messages = conversation = [{"role": "user", "content": text}]
        reqs.append({"messages": messages, "conversation": conversation, "arrival": t,
                     "structured": srng.random() < args.json_schema_ratio})
        if args.rate != float("inf"):
            t += rng.expovariate(args.rate)
    return reqs


# ------------------------------------------------------------------------------------------------ the two sides
class RequestResult:
    __slots__ = ("ok", "ttft", "itl", "e2e", "tokens", "prompt_tokens", "token_ids", "error", "structured")

    def __init__(self, structured: bool = False):
        self.ok, self.ttft, self.itl, self.e2e, self.tokens, self.prompt_tokens = False, 0.0, [], 0.0, 0, 0
        self.token_ids, self.error, self.structured = [], None, structured


class SSEClient:
    """A lean HTTP/1.1 client for streamed POSTs over keep-alive loopback connections (asyncio streams, chunked
    transfer decoding by hand), so that the client's own cost stays out of the server's figures as far as it can."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.idle: list = []

    async def post_stream(self, path: str, body: dict):
        """Yields (perf_counter time, SSE data payload) per event; raises on a non-200 answer."""
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n\r\n").encode()
        while True:
            pooled = bool(self.idle)
            reader, writer = self.idle.pop() if pooled else await asyncio.open_connection(self.host, self.port)
            writer.write(head + payload)
            try:
                line = await reader.readline()
            except ConnectionError:
                line = b""
            if line or not pooled:
                break
            writer.close()  # the server closed this idle connection (keep-alive timeout): a fresh one
        status = int(line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            n = int(headers.get("content-length", 0))
            text = await reader.readexactly(n) if n else b""
            writer.close()
            raise RuntimeError(f"HTTP {status}: {text[:200]!r}")
        buf = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            buf += await reader.readexactly(size + 2)  # + CRLF
            buf = buf[:-2]
            now = time.perf_counter()
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    yield now, event[6:]
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))

    def close(self):
        for _, w in self.idle:
            w.close()


async def http_request(client: SSEClient, model: str, req: dict, args) -> RequestResult:
    res = RequestResult(req["structured"])
    body = {"model": model, "messages": req["messages"], "max_tokens": args.output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
            "mm_processor_kwargs": {"max_dynamic_patch": args.max_tiles}}
    if req["structured"]:
        body["ignore_eos"] = False
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": BENCH_SCHEMAS[args.json_schema]}}
    last = start = time.perf_counter()
    try:
        async for now, data in client.post_stream("/v1/chat/completions", body):
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]
            for c in chunk.get("choices", ()):
                ids = c.get("token_ids")
                if ids:
                    if not res.token_ids:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.token_ids += ids
            if "error" in chunk:
                res.error = chunk["error"]["message"]
        res.e2e = last - start
        res.tokens = len(res.token_ids)
        res.ok = res.error is None and res.tokens > 0
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    return res


async def offline_request(llm, req: dict, params, request_id: str, schema: dict) -> RequestResult:
    res = RequestResult(req["structured"])
    if req["structured"]:
        params = structured_params(params, schema)
    last = start = time.perf_counter()
    seen = 0
    try:
        async for out in llm.generate(req["conversation"], params, request_id):
            now = time.perf_counter()
            if len(out.token_ids) > seen:
                if seen == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last, seen = now, len(out.token_ids)
            if out.finished:
                res.token_ids, res.prompt_tokens = list(out.token_ids), len(out.prompt_token_ids)
        res.e2e, res.tokens, res.ok = last - start, len(res.token_ids), len(res.token_ids) > 0
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
    return res


async def replay(reqs: list[dict], send, concurrency: int | None) -> tuple[list[RequestResult], float]:
    """Sends each request at its arrival offset (Poisson) and at most `concurrency` at once; (results, seconds)."""
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    t0 = time.perf_counter()

    async def one(i, req):
        delay = req["arrival"] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            return await send(i, req)
        async with gate:
            return await send(i, req)

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    return results, time.perf_counter() - t0


def structured_params(params, schema: dict):
    import dataclasses

    from internvl_engine.sampling import StructuredOutputsParams
    return dataclasses.replace(params, ignore_eos=False, structured_outputs=StructuredOutputsParams(json=schema))


# ------------------------------------------------------------------------------------------------ statistics
def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.tokens for r in ok)
    ms = lambda xs, q: 1e3 * pct(xs, q)  # noqa: E731
    s = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
         "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
         "output_tokens": out_tokens}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        s[f"mean_{name}_ms"] = 1e3 * statistics.fmean(xs) if xs else float("nan")
        for q in (50, 90, 99):
            s[f"p{q}_{name}_ms"] = ms(xs, q)
    errors = [r.error for r in results if r.error]
    if errors:
        s["errors"] = errors[:5]
    constrained = [r for r in ok if r.structured]
    if constrained and len(constrained) < len(ok):  # a mixed load: each kind's TPOT too
        for name, part in (("constrained", constrained), ("unconstrained", [r for r in ok if not r.structured])):
            xs = [(r.e2e - r.ttft) / (r.tokens - 1) for r in part if r.tokens > 1]
            s[f"{name}_requests"] = len(part)
            s[f"{name}_p50_tpot_ms"] = ms(xs, 50)
    return s


def median_of_rounds(rounds: list[dict]) -> dict:
    keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "internvl_engine", "serve", "--model", args.model, "--port", str(port),
           "--max-waiting", "100000", "--log-level", "warning", "--loop", args.server_loop, *engine_flags(args)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def loop_cpu(url: str) -> float:
    """CPU seconds of the server's event loop thread so far (its /metrics)."""
    import httpx
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("internvl_server_loop_cpu_seconds_total"):  # {model_name="..."} follows the name
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def engine_settings(args) -> dict:
    s = {"device": args.device, "max_num_seqs": args.max_num_seqs}
    if args.kv_cache_tokens:
        s["kv_cache_tokens"] = args.kv_cache_tokens
    if args.backend:
        s["backend"] = args.backend
    return s


def engine_flags(args) -> list[str]:
    flags = []
    for k, v in engine_settings(args).items():
        if v is not None:
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def modified_files() -> list[str]:
    """Tracked files that differ from the commit (the run measured them as they were)."""
    out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True).stdout
    return [line[3:] for line in out.splitlines()]


def device_name(args) -> str:
    if args.device and args.device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU x{os.cpu_count()}"


# ------------------------------------------------------------------------------------------------ main
async def run(args) -> dict:
    import httpx

    from internvl_engine import SamplingParams
    from internvl_engine.engine.async_llm import AsyncLLM

    proc = None
    url = args.base_url
    if url is None:
        proc, url = start_server(args)
    try:
        model = args.served_model_name or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        llm = None if args.base_url or args.http_only else AsyncLLM(args.model, **engine_settings(args))
        params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, max_num_tiles=args.max_tiles)
        client = SSEClient(url)
        try:
            sides = {"http": lambda i, req: http_request(client, model, req, args)}
            if llm is not None:
                counter = iter(range(10 ** 9))
                sides["offline"] = lambda i, req: offline_request(llm, req, params, f"bench-{next(counter)}",
                                                                  BENCH_SCHEMAS[args.json_schema])
            # warm up both sides (first-use costs: allocations, the vision tower, connections)
            warm = workload(argparse.Namespace(**{**vars(args), "num_prompts": 8, "rate": float("inf")}), 10 ** 6)
            for send in sides.values():
                await replay(warm, send, 8)
            loads = [("concurrency", c) for c in args.concurrencies] + [("rate", r) for r in args.rates]
            scenarios = [(kind, value, ratio) for kind, value in loads for ratio in args.json_schema_ratios]
            record = []
            for kind, value, ratio in scenarios:
                per_side = {name: [] for name in sides}
                same = []
                for rnd in range(args.rounds):
                    a = argparse.Namespace(**vars(args))
                    a.rate = value if kind == "rate" else float("inf")
                    a.json_schema_ratio = ratio
                    reqs = workload(a, rnd)
                    order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
                    got = {}
                    for name in order:
                        # CPU time of the thread running the event loop: the server's (HTTP, translation, SSE,
                        # submission) against this process's loop driving AsyncLLM (consumers, submission). Thread
                        # CPU time does not count the engine's threads, nor time waiting for a shared core.
                        loop0 = loop_cpu(url) if name == "http" else time.thread_time()
                        cpu0 = time.process_time()
                        results, duration = await replay(reqs, sides[name], value if kind == "concurrency" else None)
                        summary = summarize(results, duration)
                        tokens = max(1, summary["output_tokens"])
                        loop1 = loop_cpu(url) if name == "http" else time.thread_time()
                        summary["loop_cpu_us_per_token"] = 1e6 * (loop1 - loop0) / tokens
                        if name == "http":
                            summary["client_cpu_us_per_token"] = 1e6 * (time.process_time() - cpu0) / tokens
                        per_side[name].append(summary)
                        got[name] = results
                    if "offline" in got:
                        same += [h.token_ids == o.token_ids for h, o in zip(got["http"], got["offline"])]
                entry = {"scenario": kind, "value": value, "json_schema_ratio": ratio, "rounds": per_side,
                         "median": {name: median_of_rounds(r) for name, r in per_side.items()}}
                if same:
                    entry["greedy_ids_equal"] = f"{sum(same)}/{len(same)}"
                    med = entry["median"]
                    entry["overhead"] = {
                        "loop_cpu_us_per_token": med["http"]["loop_cpu_us_per_token"]
                        - med["offline"]["loop_cpu_us_per_token"],
                        "ttft_p50_ms": med["http"]["p50_ttft_ms"] - med["offline"]["p50_ttft_ms"],
                        "itl_p50_ms": med["http"]["p50_itl_ms"] - med["offline"]["p50_itl_ms"],
                        "tpot_p50_ms": med["http"]["p50_tpot_ms"] - med["offline"]["p50_tpot_ms"],
                        "output_throughput_ratio": med["http"]["output_token_throughput"]
                        / med["offline"]["output_token_throughput"]}
                record.append(entry)
                print_entry(entry)
        finally:
            client.close()
        if llm is not None:
            llm.shutdown()
        return {"scenarios": record, **structured_cost(record)}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def structured_cost(record: list[dict]) -> dict:
    """Per load and side: each constrained scenario's p50 TPOT over the unconstrained one's (ratio 0) at that load."""
    base = {(e["scenario"], e["value"]): e for e in record if e["json_schema_ratio"] == 0}
    cost = []
    for e in record:
        b = base.get((e["scenario"], e["value"]))
        if e["json_schema_ratio"] == 0 or b is None:
            continue
        for side, m in e["median"].items():
            row = {"scenario": e["scenario"], "value": e["value"], "json_schema_ratio": e["json_schema_ratio"],
                   "side": side, "p50_tpot_ms": m["p50_tpot_ms"], "unconstrained_load_p50_tpot_ms":
                   b["median"][side]["p50_tpot_ms"], "tpot_ratio": m["p50_tpot_ms"] / b["median"][side]["p50_tpot_ms"]}
            for k in ("constrained_p50_tpot_ms", "unconstrained_p50_tpot_ms"):
                if k in m:
                    row[k] = m[k]
            cost.append(row)
            print(f"structured cost {e['scenario']} {e['value']} ratio {e['json_schema_ratio']} {side}: TPOT p50 "
                  f"{row['p50_tpot_ms']:.2f} ms vs {row['unconstrained_load_p50_tpot_ms']:.2f} ms unconstrained "
                  f"(x{row['tpot_ratio']:.3f})", flush=True)
    return {"structured_cost": cost} if cost else {}


def print_entry(e: dict) -> None:
    label = f"{e['scenario']} {e['value']}" + (f" json {e['json_schema_ratio']}" if e["json_schema_ratio"] else "")
    for name, m in e["median"].items():
        print(f"{label:16s} {name:8s} TTFT p50/p90/p99 {m['p50_ttft_ms']:7.2f} {m['p90_ttft_ms']:7.2f} "
              f"{m['p99_ttft_ms']:7.2f} ms | TPOT p50 {m['p50_tpot_ms']:6.2f} ms | ITL p50/p90/p99 "
              f"{m['p50_itl_ms']:6.2f} {m['p90_itl_ms']:6.2f} {m['p99_itl_ms']:6.2f} ms | "
              f"{m['request_throughput']:6.2f} req/s | {m['output_token_throughput']:8.1f} out tok/s", flush=True)
    if "overhead" in e:
        o = e["overhead"]
        print(f"{label:16s} HTTP overhead: TTFT p50 {o['ttft_p50_ms']:+.3f} ms, ITL p50 {o['itl_p50_ms']:+.3f} ms, "
              f"output throughput x{o['output_throughput_ratio']:.3f}, event-loop CPU "
              f"{o['loop_cpu_us_per_token']:+.0f} us/token; greedy ids equal {e['greedy_ids_equal']}", flush=True)


def plot(record: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    entries = record["scenarios"]
    labels = [f"{e['scenario']}={e['value']}" for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (metric, title) in zip(axes, (("p50_ttft_ms", "TTFT p50 (ms)"), ("p50_itl_ms", "ITL p50 (ms)"),
                                          ("output_token_throughput", "output tokens/s"))):
        sides = list(entries[0]["median"])
        x = np.arange(len(entries))
        for k, side in enumerate(sides):
            ax.bar(x + k * 0.4, [e["median"][side][metric] for e in entries], 0.4, label=side)
        ax.set_xticks(x + 0.2 * (len(sides) - 1), labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{record['model']} on {record['device']} @ {record['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--base-url", default=None, help="target a running server (HTTP only; no offline side)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario (sides alternate; medians reported)")
    ap.add_argument("--input-words", type=int, default=24)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--image-ratio", type=float, default=0.25)
    ap.add_argument("--max-tiles", type=int, default=1)
    ap.add_argument("--max-concurrency", default="1,32", help="comma list of fixed concurrencies ('' for none)")
    ap.add_argument("--request-rate", default="", help="comma list of Poisson rates in requests/s")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of both engines (OMP_NUM_THREADS for the server; default: torch's)")
    ap.add_argument("--server-loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                    help="the started server's event loop")
    ap.add_argument("--json-schema-ratio", default="0",
                    help="comma list of shares of requests carrying a JSON schema (one scenario each per load)")
    ap.add_argument("--json-schema", default="plain", choices=sorted(BENCH_SCHEMAS),
                    help="the constrained requests' schema (BENCH_SCHEMAS)")
    ap.add_argument("--http-only", action="store_true", help="no offline side (the server alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    args.concurrencies = [int(c) for c in args.max_concurrency.split(",") if c.strip()]
    args.rates = [float(r) for r in args.request_rate.split(",") if r.strip()]
    args.rate = float("inf")
    args.json_schema_ratios = [float(r) for r in args.json_schema_ratio.split(",") if r.strip()]
    args.json_schema_ratio = args.json_schema_ratios[0]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    measured, modified = commit(), modified_files()  # the code as it is when both engines start
    result = asyncio.run(run(args))
    record = {"schema": "internvl-engine/serve/1", "date": time.strftime("%Y-%m-%d"), "device": device_name(args),
              "commit": measured, "modified_files": modified,
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "model": args.model, "engine": engine_settings(args), "threads": args.threads,
              "workload": {"num_prompts": args.num_prompts, "rounds": args.rounds, "input_words": args.input_words,
                           "output_tokens": args.output_tokens, "image_ratio": args.image_ratio,
                           "max_tiles": args.max_tiles, "seed": args.seed, "temperature": 0.0, "ignore_eos": True,
                           "json_schema_ratios": args.json_schema_ratios, "json_schema": args.json_schema,
                           "schema": BENCH_SCHEMAS[args.json_schema]},
              **result}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        plot(record, args.plot)


if __name__ == "__main__":
    main()
