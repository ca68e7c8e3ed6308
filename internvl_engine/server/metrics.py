"""GET /metrics in the Prometheus text format (version 0.0.4), written by hand: vLLM's metric set under the prefix
"internvl_" (a dashboard built for vLLM works with `vllm:` replaced by `internvl_`), every series labelled with
model_name.

Where each number comes from:
- request histograms and token / finish-reason counters: the engine's RequestStats (engine/request_stats.py), kept
  by its output processor per token and per finished engine request, aborted ones included;
- gauges of the scheduler, KV pool and caches: the engine's stats() snapshot at scrape time;
- HTTP: requests_total{outcome} (this module's OUTCOMES, one per generation request) and, for every route,
  http_requests_total{method,route,status} and http_request_duration_seconds{route} (HTTPMetricsMiddleware);
- the process: read from /proc/self on Linux (process.py's standard names).
Updated only from the server's event loop, except RequestStats (the engine's thread; read without its lock)."""
from __future__ import annotations

import time

from ..engine.request_stats import LATENCY_BUCKETS, Histogram
from .process import process_metrics

PREFIX = "internvl_"
# HTTP request outcomes: success (finished: stop or length), abort (the client left, or stopped reading: cut off by
# the server or its requests aborted by AsyncLLM, 408), error (failed while running: 500), invalid (400/404),
# too_large (413), unauthorized (401), rejected (429), unavailable (503: engine dead, or cut at shutdown)
OUTCOMES = ("success", "abort", "error", "invalid", "too_large", "unauthorized", "rejected", "unavailable")
STATUS_OUTCOME = {400: "invalid", 404: "invalid", 401: "unauthorized", 408: "abort", 413: "too_large",
                  429: "rejected", 503: "unavailable", 500: "error"}
# label values a client controls are mapped onto these, so no request can grow the series without bound
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def _num(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return "+Inf" if v == float("inf") else "-Inf" if v == float("-inf") else repr(v)
    return str(v)


def _escape(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """The text of one scrape: each family's HELP and TYPE once, then its samples, every one with model_name."""

    def __init__(self, model_name: str):
        self.base = {"model_name": model_name}
        self.lines: list[str] = []

    def family(self, kind: str, name: str, help: str, samples, prefix: str = PREFIX) -> None:
        """samples: [(extra labels dict or None, value)]."""
        name = prefix + name
        help = help.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            self.lines.append(f"{name}{_labels({**self.base, **(labels or {})})} {_num(value)}")

    def histogram(self, name: str, help: str, series) -> None:
        """series: [(extra labels dict or None, Histogram)]."""
        name = PREFIX + name
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for labels, h in series:
            counts, total = h.snapshot()
            base = {**self.base, **(labels or {})}
            running = 0
            for bound, c in zip(h.bounds, counts):
                running += c
                self.lines.append(f"{name}_bucket{_labels({**base, 'le': _num(float(bound))})} {running}")
            running += counts[-1]
            self.lines += [f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {running}",
                           f"{name}_sum{_labels(base)} {_num(float(total))}", f"{name}_count{_labels(base)} {running}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


HISTOGRAM_HELP = {
    "time_to_first_token_seconds": "Engine arrival to the request's first token.",
    "inter_token_latency_seconds": "Gap between consecutive tokens of a sample.",
    "time_per_output_token_seconds": "Mean decode forward time per output token of a request.",
    "e2e_request_latency_seconds": "Engine arrival to the request's end (any finish reason).",
    "request_queue_time_seconds": "Engine arrival to first scheduled.",
    "request_prefill_time_seconds": "First scheduled to first token.",
    "request_decode_time_seconds": "First token to last token.",
    "request_inference_time_seconds": "First scheduled to last token.",
    "request_prompt_tokens": "Prompt tokens per finished request.",
    "request_generation_tokens": "Generated tokens per finished request (all its samples).",
    "request_max_num_generation_tokens": "The longest sample's generated tokens per finished request.",
    "request_params_n": "The n (samples) of each finished request.",
    "request_params_max_tokens": "The max_tokens of each finished request.",
}


class ServerMetrics:
    def __init__(self):
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.http_counts: dict[tuple[str, str, str], int] = {}  # (method, route, status) -> responses
        self.http_durations: dict[str, Histogram] = {}          # route -> seconds to the end of the body

    def outcome(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in METHODS else "other", route, str(status))
        self.http_counts[key] = self.http_counts.get(key, 0) + 1
        h = self.http_durations.get(route)
        if h is None:
            h = self.http_durations[route] = Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def render(self, llm, model_name: str) -> str:
        try:
            llm.check_health()
            healthy = 1
        except Exception:
            healthy = 0
        engine = llm.engine
        stats, rs = engine.stats(), engine.output_processor.stats
        x = Exposition(model_name)
        x.family("gauge", "model_info", "The served model.", [(None, 1)])
        x.family("gauge", "engine_healthy", "1 while the engine is alive, 0 once it is dead.", [(None, healthy)])
        x.family("counter", "requests_total", "HTTP generation requests by outcome.",
                 [({"outcome": k}, v) for k, v in self.requests.items()])
        x.family("counter", "request_success_total", "Finished engine requests by finish reason (a request with "
                 "several samples counts once: error over abort over length over stop).",
                 [({"finished_reason": k}, v) for k, v in rs.finished.items()])
        x.family("counter", "prompt_tokens_total", "Prompt tokens of requests whose prefill completed.",
                 [(None, rs.prompt_tokens)])
        x.family("counter", "generation_tokens_total", "Generated tokens, counted as they are generated.",
                 [(None, rs.generation_tokens)])
        self._engine_gauges(x, stats)
        # render() runs on the event loop's thread: its CPU time is the whole HTTP layer's (and submissions')
        x.family("counter", "server_loop_cpu_seconds_total",
                 "CPU time of the server's event loop thread (HTTP, translation, SSE, request submission).",
                 [(None, time.thread_time())])
        for name, h in rs.histograms().items():
            x.histogram(name, HISTOGRAM_HELP[name], [(None, h)])
        x.family("counter", "http_requests_total", "HTTP responses by method, route and status.",
                 [({"method": m, "route": r, "status": s}, v) for (m, r, s), v in sorted(self.http_counts.items())])
        x.histogram("http_request_duration_seconds", "Request start to the end of the response body, per route.",
                    [({"route": r}, h) for r, h in sorted(self.http_durations.items())])
        for kind, name, help, value in process_metrics():
            x.family(kind, name, help, [(None, value)], prefix="")
        return x.text()

    @staticmethod
    def _engine_gauges(x: Exposition, stats) -> None:
        free, total = stats.kv_blocks_free, stats.kv_blocks_total
        v_hits, v_misses = stats.vision_cache_hits, stats.vision_cache_misses
        p_queries, p_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        x.family("gauge", "num_requests_running", "Sequences (samples) the scheduler is running.",
                 [(None, stats.running)])
        x.family("gauge", "num_requests_waiting", "Sequences waiting to be scheduled.", [(None, stats.waiting)])
        x.family("gauge", "kv_cache_blocks_total", "Blocks in the paged KV pool.", [(None, total)])
        x.family("gauge", "kv_cache_blocks_free", "Free KV blocks (unused or cached, evictable).", [(None, free)])
        usage = [(None, (total - free) / total if total else 0.0)]
        x.family("gauge", "kv_cache_usage_perc", "Share of the KV pool in use (0-1).", usage)
        x.family("gauge", "gpu_cache_usage_perc", "kv_cache_usage_perc under vLLM's older name (any device).", usage)
        x.family("counter", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache at admission.",
                 [(None, p_queries)])
        x.family("counter", "prefix_cache_hits_total", "Prompt tokens whose KV came from the prefix cache.",
                 [(None, p_hits)])
        x.family("gauge", "prefix_cache_hit_rate", "prefix_cache_hits_total / prefix_cache_queries_total.",
                 [(None, p_hits / p_queries if p_queries else 0.0)])
        x.family("counter", "vision_cache_hits_total", "Images whose features came from the vision cache.",
                 [(None, v_hits)])
        x.family("counter", "vision_cache_misses_total", "Vision cache lookups that missed.", [(None, v_misses)])
        x.family("gauge", "vision_cache_hit_rate", "Vision cache hits / lookups (0 without lookups or cache).",
                 [(None, v_hits / (v_hits + v_misses) if v_hits + v_misses else 0.0)])
        # vLLM's names for the multimodal (here: vision feature) cache
        x.family("counter", "mm_cache_queries_total", "Vision cache lookups (vLLM's name).",
                 [(None, v_hits + v_misses)])
        x.family("counter", "mm_cache_hits_total", "Vision cache hits (vLLM's name).", [(None, v_hits)])
        x.family("counter", "num_preemptions_total", "Sequences preempted for lack of KV blocks.",
                 [(None, stats.num_preemptions)])


class HTTPMetricsMiddleware:
    """Pure ASGI (nothing buffered): counts every HTTP response by method, route and status, and times it from the
    request's start to the end of its body (a stream: its last event), or to where it was cut. The route is the
    path of one of the app's routes, else "other" (a path a client made up never becomes a label)."""

    def __init__(self, app, metrics: ServerMetrics, routes):
        self.app, self.metrics, self._routes_of = app, metrics, routes
        self._routes: frozenset | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._routes is None:  # every route is in place once requests arrive
            self._routes = frozenset(self._routes_of())
        route = scope["path"] if scope["path"] in self._routes else "other"
        start, state = time.perf_counter(), {"status": None, "done": False}

        def done():
            if not state["done"]:
                state["done"] = True
                self.metrics.http_request(scope["method"], route, state["status"] or 500,
                                          time.perf_counter() - start)

        async def timed_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            done()
